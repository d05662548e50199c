"""Closed-loop HTTP/1.1 load generator, run as its own process by bench/compare.py. Prints one JSON line.

    python bench/loadgen.py --url http://127.0.0.1:8000/v1/score --bodies DIR --content-type image/png \
        --concurrency 8 --seconds 25 --max-requests 100000 [--think-ms 0]

Each of `concurrency` clients holds one keep-alive connection, sends a prebuilt POST (the files DIR/0.body,
1.body, ... in turn), reads the whole answer, waits an exponential think time if --think-ms is set, and sends the
next. New requests stop at --max-requests or after --seconds; answers still outstanding then are abandoned.

Why not wrk: here a 32-image request can take seconds, so at 64 clients one round of requests lasts longer than
a short run, and a rate over the whole run mostly measures the start-up transient. This generator measures the
steady state: the window starts once every client has had one answer ("warm"), and images/s is what completed
inside the window divided by its length. Latency percentiles are over requests answered in the window. If no
window formed (the time ran out first), the rate over the whole run is given instead, with "steady": false.
At the rates seen here (under a thousand requests per second) the client's CPU cost per request (~0.1 ms) is
small; compare.py reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time
from pathlib import Path
from urllib.parse import urlsplit


def build_requests(url: str, bodies: list[bytes], content_type: str) -> list[bytes]:
    u = urlsplit(url)
    host = u.netloc
    return [
        (
            f"POST {u.path or '/'} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(b)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def run(args: argparse.Namespace) -> dict:
    files = sorted(Path(args.bodies).glob("*.body"), key=lambda p: int(p.stem))
    reqs = build_requests(args.url, [f.read_bytes() for f in files], args.content_type)
    u = urlsplit(args.url)
    t_start = time.perf_counter()
    deadline = t_start + args.seconds
    issued = 0
    done: list[tuple[float, float, int]] = []  # (finish time, latency, status)
    answered = [0] * args.concurrency
    warm_at: list[float] = []
    errors = 0

    async def client(cid: int) -> None:
        nonlocal issued, errors
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        i = cid
        try:
            while issued < args.max_requests and time.perf_counter() < deadline:
                issued += 1
                req = reqs[i % len(reqs)]
                i += args.concurrency
                t0 = time.perf_counter()
                writer.write(req)
                await writer.drain()
                try:
                    status = await read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(u.hostname, u.port)
                    continue
                t1 = time.perf_counter()
                done.append((t1, t1 - t0, status))
                answered[cid] += 1
                if answered[cid] == 1 and all(answered) and not warm_at:
                    warm_at.append(t1)
                if args.think_ms > 0:
                    await asyncio.sleep(random.expovariate(1000.0 / args.think_ms))
        finally:
            writer.close()

    tasks = [asyncio.create_task(client(c)) for c in range(args.concurrency)]
    remaining = deadline - time.perf_counter() + 0.05
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
    for t in pending:  # answers outstanding at the deadline are abandoned
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    t_end = min(time.perf_counter(), deadline) if pending else max((d[0] for d in done), default=t_start)
    steady = bool(warm_at) and t_end - warm_at[0] > 0 and any(d[0] > warm_at[0] for d in done)
    if steady:
        window = [d for d in done if d[0] > warm_at[0]]
        span = t_end - warm_at[0]
    else:
        window, span = done, max(t_end - t_start, 1e-9)
    ok = [d for d in window if d[2] == 200]
    lat = sorted(d[1] for d in window)

    def pct(q: float) -> float:
        return 1000.0 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "requests": len(done),
        "window_requests": len(window),
        "errors": errors + sum(1 for d in done if d[2] != 200),
        "requests_per_s": len(ok) / span,
        "window_s": span,
        "steady": steady,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "elapsed_s": time.perf_counter() - t_start,
        "client_cpu_s": ru.ru_utime + ru.ru_stime,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--bodies", required=True)
    p.add_argument("--content-type", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--think-ms", type=float, default=0.0, help="mean exponential pause between answer and next request")
    print(json.dumps(asyncio.run(run(p.parse_args()))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
