"""`symguard serve --processes N` against one process, interleaved, under the same closed-loop load.

    .venv/bin/python bench/processes.py --rounds 2 --seconds 12                  # --processes 1 vs 2
    .venv/bin/python bench/processes.py --layout "1" --layout "2" --layout "1 --max-batch 64"

Each layout is a string of `symguard serve` flags after `--processes`. For each round and layout the server starts
(default bundle), gets 3 s of warm-up load, then two measured runs from bench/loadgen.py in its own process:
32-image multipart requests from 8 clients, and single PNGs from 64 clients. Printed per run: images/s, p50/p99,
and the CPU% of the server's whole process tree (parent and workers; 100% = one core). The clients share the
machine with the server, so compare layouts measured alike, not absolute capacity.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.compare import cpu_seconds  # noqa: E402
from bench.workload import BOUNDARY, digits_png, free_port, multipart, wait_ready  # noqa: E402

SCENARIOS = [("32 img/req x 8", "batch", f"multipart/form-data; boundary={BOUNDARY}", 8, 32),
             ("1 img/req x 64", "single", "image/png", 64, 1)]  # fmt: skip


def load(port: int, bodies: Path, content_type: str, clients: int, seconds: float) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/loadgen.py"), "--url", f"http://127.0.0.1:{port}/v1/score", "--bodies",
         str(bodies), "--content-type", content_type, "--concurrency", str(clients), "--seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(layout: str, bodies: Path, seconds: float) -> list[str]:
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "warning",
            "--processes", *layout.split()]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc, 120, poll_s=0.5)
        ps = psutil.Process(proc.pid)
        for name, folder, content_type, clients, per_request in SCENARIOS:
            load(port, bodies / folder, content_type, clients, 3)  # warm-up
            cpu0, t0 = cpu_seconds([ps, *ps.children(recursive=True)]), time.monotonic()
            r = load(port, bodies / folder, content_type, clients, seconds)
            cpu = 100 * (cpu_seconds([ps, *ps.children(recursive=True)]) - cpu0) / (time.monotonic() - t0)
            lines.append(f"{name}: {r['requests_per_s'] * per_request:8,.0f} img/s  p50 {r['p50_ms']:6.1f} ms  "
                         f"p99 {r['p99_ms']:6.1f} ms  cpu {cpu:4.0f}%  errors {r['errors']}")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--layout", action="append", help='`--processes` and more flags, e.g. "2 --max-batch 64" '
                   '(repeatable; default: "1" and "2")')  # fmt: skip
    a = p.parse_args()
    layouts = a.layout or ["1", "2"]
    bodies = Path(tempfile.mkdtemp(prefix="symguard-processes-"))
    pngs = digits_png(256)
    (bodies / "single").mkdir()
    (bodies / "batch").mkdir()
    for i in range(64):
        (bodies / "single" / f"{i}.body").write_bytes(pngs[i])
    for i in range(8):
        (bodies / "batch" / f"{i}.body").write_bytes(multipart(pngs[32 * i : 32 * (i + 1)]))
    for r in range(a.rounds):
        for layout in layouts:
            for line in measure(layout, bodies, a.seconds):
                print(f"round {r + 1}, --processes {layout:<12s} {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
