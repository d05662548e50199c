"""Where symguard's time goes under load: `symguard serve` runs under py-spy (all threads, GIL-holding or not),
bench/loadgen.py drives it, and the sampled stacks are put into stages.

    .venv/bin/pip install py-spy psutil
    .venv/bin/python bench/profile_server.py                      # 1-image and 32-image requests, 8 clients, 20 s each
    .venv/bin/python bench/profile_server.py --server-arg=--max-delay-ms=0 --seconds 10

Stages, by the innermost frame of ours (or the library's) that each sample is in:
  inference   ONNX Runtime's session.run (runtime.infer)
  decode      Pillow opening and decoding the PNG, EXIF (decode.py)
  preprocess  mode, fit/pad, normalise, stack (preprocess.py, inputs.to_batch)
  scoring     calibration and p-values (scoring.py) and per-image metrics (metrics.record_rows)
  serialise   the response model and JSON (pydantic model_dump_json, orjson)
  http        uvicorn / h11 / httptools / starlette / multipart parsing, reading the body, middleware
  queue       the batching worker's bookkeeping (batching.py outside session.run) and thread hand-offs (anyio)
  loop        the event loop's own C code (uvloop: socket I/O, httptools parsing, or waiting in epoll)
  other       everything else the process did (asyncio, thread pools, logging)
Shares are of the samples of threads at work; start-up and parked threads are left out (see STARTUP, IDLE_*).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare import BUNDLE_REF, write_bodies  # noqa: E402
from bench.workload import digits_png, free_port, multipart, wait_ready  # noqa: E402

# first match wins, tested innermost frame outwards: (stage, substring of "function (file)")
RULES: list[tuple[str, str]] = [
    ("inference", "run (onnxruntime/"),
    ("decode", "service/decode.py"),
    ("preprocess", "service/preprocess.py"),
    ("preprocess", "to_batch (service/inputs.py"),
    ("scoring", "service/scoring.py"),
    ("scoring", "record_rows (service/metrics.py"),
    ("serialise", "model_dump_json"),
    ("serialise", "orjson"),
    ("serialise", "score (service/routes_v1.py"),  # the handler's own frames: building the response model
    ("queue", "anyio/"),  # handing decode work to the thread pool and back
    ("queue", "Queue.put"),
    ("queue", "run_in_executor"),
    ("http", "multipart"),
    ("http", "h11"),
    ("http", "httptools"),
    ("http", "uvicorn/protocols"),
    ("http", "starlette/requests.py"),
    ("http", "starlette/formparsers.py"),
    ("http", "service/middleware.py"),
    ("http", "service/inputs.py"),
    ("queue", "service/batching.py"),
]
STAGES = ["inference", "decode", "preprocess", "scoring", "serialise", "http", "queue", "loop", "other"]
# Left out of the shares: start-up (imports, session creation, self-check) and threads that py-spy sampled while
# they waited (its idle detection misses threads parked in a Condition here).
STARTUP = ("importlib", "InferenceSession.__init__", "pydantic/_internal/_generate_schema", "(service/registry.py",
           "check (service/runtime.py")  # fmt: skip
IDLE_INNERMOST = ("Condition.wait", "Event.wait", "Queue.get", "_worker (concurrent/futures/thread.py")
# The main thread's innermost Python frame is the event loop's run call while uvloop's C code works (socket I/O,
# HTTP parsing by httptools) or waits in epoll: py-spy cannot tell which, so this is its own line.
LOOP_INNERMOST = ("Runner.run", "run_until_complete", "asyncio_run")


def stage_of(stack: str) -> str:
    frames = [f for f in stack.split(";") if f]
    if any(pat in f for f in frames for pat in STARTUP):
        return "startup"
    if frames and any(pat in frames[-1] for pat in IDLE_INNERMOST):
        return "idle"
    if frames and any(pat in frames[-1] for pat in LOOP_INNERMOST):
        return "loop"
    for frame in reversed(frames):  # innermost first
        for stage, pat in RULES:
            if pat in frame:
                return stage
    return "other"


def breakdown(collapsed: Path) -> dict[str, float]:
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[stage_of(stack)] += int(n)
    total = sum(counts[s] for s in STAGES) or 1
    return {s: 100.0 * counts[s] / total for s in STAGES} | {"samples": total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench")
    p.add_argument("--tag", default="", help="suffix for the output files")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="symguard-prof-"))
    singles = digits_png(512)
    bodies = write_bodies(tmp, singles, [multipart(singles[32 * k : 32 * k + 32]) for k in range(16)])
    results = {}
    for per in (1, 32):
        port = free_port()
        raw = a.out / f"pyspy-{per}img{a.tag}.txt"
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", "200", "-o", str(raw), "--",
               sys.executable, "-m", "service.cli", "serve", "--model", BUNDLE_REF, "--port", str(port),
               "--log-level", "warning", "--intra-op-threads", str(a.threads), *a.server_arg]  # fmt: skip
        spy = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + "/readyz", spy, 120, poll_s=0.5)  # py-spy exits with the server it runs
        d, _, ctype = bodies[per]
        load = [sys.executable, str(ROOT / "bench/loadgen.py"), "--url", url + "/v1/score", "--bodies", str(d),
                "--content-type", ctype, "--concurrency", str(a.concurrency), "--seconds", f"{a.seconds:g}"]  # fmt: skip
        r = json.loads(subprocess.run(load, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        server = [c for c in __import__("psutil").Process(spy.pid).children() if "service.cli" in " ".join(c.cmdline())]
        for c in server:
            c.send_signal(signal.SIGINT)  # graceful: py-spy writes its file when the program exits
        spy.wait(120)
        results[per] = {"load": r, "cpu_share_pct": breakdown(raw), "server_args": a.server_arg}
        print(f"{per} image(s)/request x {a.concurrency}: {r['requests_per_s'] * per:,.0f} img/s, "
              f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")  # fmt: skip
        print("  CPU share by stage: " + ", ".join(f"{k} {v:.1f}%" for k, v in results[per]["cpu_share_pct"].items()
                                                  if k != "samples") + f" ({results[per]['cpu_share_pct']['samples']} samples)")  # fmt: skip
    (a.out / f"profile{a.tag}.json").write_text(json.dumps(results, indent=1))
    print(f"raw stacks: {a.out}/pyspy-*.txt (py-spy raw/collapsed format); summary {a.out}/profile.json")
    os.system(f"rm -rf {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
