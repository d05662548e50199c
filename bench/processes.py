"""One process with 2 ONNX Runtime threads against two processes with 1 thread each (one per core), interleaved.

    .venv/bin/python bench/processes.py --rounds 2 --seconds 12

Each configuration starts `symguard serve` (default bundle) on free ports, 8 client threads send 32-image multipart
requests split evenly over the servers for --seconds, and the total images/s is printed. Clients run in this
process, so the figures are for comparing configurations measured alike, not absolute capacity.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.workload import BOUNDARY, digits_png, free_port, multipart, wait_ready  # noqa: E402

CONFIGS = {"1 process x 2 threads": [2], "2 processes x 1 thread": [1, 1]}


def measure(threads: list[int], seconds: float, body: bytes) -> float:
    ports = [free_port() for _ in threads]
    procs = [
        subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(p), "--intra-op-threads", str(t),
                          "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for p, t in zip(ports, threads, strict=True)
    ]
    try:
        for p, proc in zip(ports, procs, strict=True):
            wait_ready(f"http://127.0.0.1:{p}/readyz", proc, 120, poll_s=0.5)
        done = [0] * 8
        stop = time.monotonic() + seconds
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}

        def client(k: int) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{ports[k % len(ports)]}", timeout=60) as c:
                while time.monotonic() < stop:
                    r = c.post("/v1/score", content=body, headers=headers)
                    r.raise_for_status()
                    done[k] += 32

        workers = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(done) / seconds
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=12.0)
    a = p.parse_args()
    body = multipart(digits_png(32))
    for r in range(a.rounds):
        for name, threads in CONFIGS.items():
            print(f"round {r + 1}, {name}: {measure(threads, a.seconds, body):,.0f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
