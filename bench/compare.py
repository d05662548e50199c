"""Side by side, one run, one machine: the naive torch service (A), BentoML with adaptive batching (B), symguard
(C) and ONNX Runtime alone (D), on the shipped default bundle, on 127.0.0.1.

    .venv/bin/python bench/compare.py            # ~15 min: 25 s per (scenario, system)
    .venv/bin/python bench/compare.py --quick    # ~3 min: 5 s per (scenario, system)
    .venv/bin/python bench/compare.py --soak 100000   # also: symguard's RSS over a 100k-request run

Needs: psutil in .venv (`.venv/bin/pip install psutil`) and BentoML in its own venv (see bench/bento_service.py; without
bench/.venv-bentoml, B is skipped and said so). A runs in the project's .venv (torch is a `train` extra).

* A. bench/naive_torch.py: FastAPI + eager torch `models.networks.Bundle` rebuilt from the bundle's ONNX
  initializers (parity with ONNX Runtime printed before measuring), one forward per request.
* B. bench/bento_service.py: BentoML, an HTTP front service + a batchable model service (max_batch_size 64,
  max_latency_ms 60,000), same ONNX graph and ORT settings, same decode/preprocess/scoring code.
* C. `symguard serve --processes 2` (one server process per thread, as B gets one model worker per thread;
  --c-processes 1 for a single process), its other settings the defaults.
* D. ONNX Runtime in this process, symguard's session options, batches of 1/32/64/256 preprocessed tensors,
  measured before and after the HTTP runs (servers idle); the limit is the better of the two per batch size.
  FLOPs per image from bench/flops.py and the implied GFLOP/s.

Load: bench/loadgen.py (closed loop: each client sends its next request when the answer is in) in its own
process, measuring the steady state (see its docstring for why not wrk); concurrency 1, 8, 64; single-image
requests (raw PNG body) and 32-image requests (multipart, 32 PNGs);
each run bounded by --seconds and --max-requests. Systems run interleaved: for each scenario, A, B and C in turn
(the order rotates per scenario), while the two others are stopped (SIGSTOP: on 2 cores an idle BentoML or torch
server's background threads took CPU from the one under load), and D's second measurement runs with all stopped.
Server CPU% (100% = one core) and peak RSS (summed over the server's process tree, sampled every 0.2 s) come
from psutil.
Results: a table on stdout and a JSON file under runs/bench/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flops import count_graph  # noqa: E402
from bench.workload import BOUNDARY, NotReady, digits_png, free_port, multipart, wait_ready  # noqa: E402

BUNDLE_REF = "mnist-multiple-flip:8"
BUNDLE_DIR = ROOT / "models/repository/mnist-multiple-flip/8"
BENTO_VENV = ROOT / "bench/.venv-bentoml"
PY = sys.executable


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    key: str
    label: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        self.port = free_port()
        cmd = [c.replace("{port}", str(self.port)) for c in self.cmd]
        log = open(log_dir / f"{self.key}.log", "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 240) -> None:
        try:
            wait_ready(self.url + "/readyz", self.proc, timeout, poll_s=0.5)
        except NotReady as e:
            raise SystemExit(f"{self.label}: {e}; see its log") from None

    def tree(self) -> list[psutil.Process]:
        p = psutil.Process(self.proc.pid)
        return [p, *p.children(recursive=True)]

    def wait_idle(self, below: float = 0.15, for_s: float = 1.0, timeout: float = 120.0) -> float:
        """Wait until the server's process tree uses under `below` cores for `for_s` seconds: a run that ended with
        requests still queued (abandoned at the deadline) must not eat into the next run. -> seconds waited."""
        t0 = time.perf_counter()
        procs = self.tree()
        while time.perf_counter() - t0 < timeout:
            c0 = cpu_seconds(procs)
            time.sleep(for_s)
            if (cpu_seconds(procs) - c0) / for_s < below:
                break
        return time.perf_counter() - t0

    def signal(self, sig: int) -> None:
        """To the whole process tree: BentoML's workers run in sessions of their own, out of reach of killpg."""
        if self.proc is not None and self.proc.poll() is None:
            for p in self.tree():
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.signal(signal.SIGCONT)  # a stopped process would hold SIGTERM pending (compare killed mid-run)
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and the workers it spawned
            self.proc.wait(30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def stopped(servers: list[Server]) -> Iterator[None]:
    """`servers` are stopped (SIGSTOP) for the block: on two cores an idle server's background threads (BentoML's
    dispatcher and monitors, torch's pool) would otherwise take CPU from the one under load, or from D."""
    for s in servers:
        s.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for s in servers:
            s.signal(signal.SIGCONT)


def others(active: dict[str, Server], key: str) -> list[Server]:
    return [s for k, s in active.items() if k != key]


def servers(
    threads: int, c_args: list[str] | None = None, b_workers: int = 1, c_processes: int = 1
) -> dict[str, Server]:
    s = {
        "A": Server(
            "A", "A naive torch (FastAPI, eager, 1 fwd/request)",
            [PY, "bench/naive_torch.py", "--port", "{port}", "--threads", str(threads)],
        ),
        "B": Server(
            "B", "B BentoML (adaptive batching, ORT)",
            [str(BENTO_VENV / "bin/bentoml"), "serve", "bench.bento_service:Front", "--host", "127.0.0.1",
             "--port", "{port}"],
            {"PYTHONPATH": str(ROOT), "BENTOML_DO_NOT_TRACK": "True",
             "SYMGUARD_BENCH_THREADS": str(max(1, threads // b_workers)),
             "SYMGUARD_BENCH_BENTO_MODEL_WORKERS": str(b_workers), "SYMGUARD_BENCH_BUNDLE": str(BUNDLE_DIR)},
        ),
        "C": Server(
            "C", f"C symguard serve ({c_processes} process{'es' if c_processes > 1 else ''})",
            [PY, "-m", "service.cli", "serve", "--model", BUNDLE_REF, "--port", "{port}", "--log-level", "warning",
             "--processes", str(c_processes), "--inference-workers", str(threads), "--intra-op-threads", "1",
             *(c_args or [])],
        ),
    }  # fmt: skip
    return s


# ---------------------------------------------------------------- sampling the server


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of these processes so far (ones that exited meanwhile count as 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Sampler:
    """CPU seconds and peak RSS of a server's process tree while a run lasts."""

    def __init__(self, server: Server, every: float = 0.2) -> None:
        self.server, self.every = server, every
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)


    def _rss(self) -> int:
        total = 0
        for p in self.server.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self) -> Sampler:
        self.procs = self.server.tree()
        self.cpu0, self.t0 = cpu_seconds(self.procs), time.perf_counter()
        self.peak_rss = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())
        self.cpu_pct = 100.0 * (cpu_seconds(self.procs) - self.cpu0) / (time.perf_counter() - self.t0)


# ---------------------------------------------------------------- load: bench/loadgen.py in its own process


@dataclass
class Run:
    scenario: str
    system: str
    per_request: int
    concurrency: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_pct: float
    peak_rss_mb: float
    wall_s: float
    client_cpu_pct: float
    steady: bool = True
    mean_delay_ms: float = 0.0


def write_bodies(tmp: Path, singles: list[bytes], batches: list[bytes]) -> dict[int, tuple[Path, int, str]]:
    """Request bodies as files DIR/0.body, 1.body, ...: raw PNGs for one image, multipart for 32."""
    out = {}
    for per, bodies, ctype in (
        (1, singles, "image/png"),
        (32, batches, f"multipart/form-data; boundary={BOUNDARY}"),
    ):
        d = tmp / f"bodies{per}"
        d.mkdir()
        for k, b in enumerate(bodies):
            (d / f"{k}.body").write_bytes(b)
        out[per] = (d, len(bodies), ctype)
    return out


def run_load(
    server: Server, bodies: dict, per: int, conc: int, seconds: float, max_requests: int, think_ms: float = 0.0
) -> Run:
    d, _, ctype = bodies[per]
    server.wait_idle()
    cmd = [PY, str(ROOT / "bench/loadgen.py"), "--url", server.url + "/v1/score", "--bodies", str(d),
           "--content-type", ctype, "--concurrency", str(conc), "--seconds", f"{seconds:g}",
           "--max-requests", str(max_requests), "--think-ms", f"{think_ms:g}"]  # fmt: skip
    with Sampler(server) as s:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed: {out.stdout}\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return Run(
        scenario=f"{per} img/req x {conc}", system=server.key, per_request=per, concurrency=conc,
        requests=r["requests"], errors=r["errors"], images_per_s=r["requests_per_s"] * per,
        p50_ms=r["p50_ms"], p99_ms=r["p99_ms"], cpu_pct=s.cpu_pct, peak_rss_mb=s.peak_rss / 2**20,
        wall_s=r["elapsed_s"], client_cpu_pct=100.0 * r["client_cpu_s"] / r["elapsed_s"], steady=r["steady"],
        mean_delay_ms=think_ms,
    )  # fmt: skip


# ---------------------------------------------------------------- checks before measuring


def same_answers(active: dict[str, Server], png: bytes) -> dict[str, float]:
    """Every system scores the same digit; max |angle| difference to C in degrees, and the verdicts must agree."""
    res = {}
    for k, s in active.items():
        r = httpx.post(s.url + "/v1/score", content=png, headers={"content-type": "image/png"}, timeout=60)
        r.raise_for_status()
        res[k] = r.json()["results"][0]
    ref = res["C"]
    diffs = {}
    for k, row in res.items():
        if row["verdict"] != ref["verdict"] or row["group"] != ref["group"]:
            raise SystemExit(f"{k} disagrees with symguard: {row} vs {ref}")
        diffs[k] = abs(row["angle_deg"] - ref["angle_deg"])
    return diffs


def naive_parity() -> str:
    out = subprocess.run([PY, "bench/naive_torch.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the naive torch model does not match ONNX Runtime:\n{out.stdout}{out.stderr}")
    return out.stdout.strip()


# ---------------------------------------------------------------- D: ONNX Runtime alone


def ort_limit(threads: int, seconds: float) -> dict:
    """Images/s by batch size, the better of two layouts of the same cores: one session.run at a time on `threads`
    intra-op threads, and `threads` single-threaded session.runs at once (symguard's default layout)."""
    wide, narrow = ort_layout(threads, 1, seconds), ort_layout(1, threads, seconds)
    print("D layouts, images/s by batch: "
          f"1 run x {threads} threads {fmt_rate(wide)}; {threads} runs x 1 thread {fmt_rate(narrow)}")  # fmt: skip
    return {b: max(wide[b], narrow[b]) for b in wide}


def ort_layout(intra: int, runs: int, seconds: float) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from service.decode import decode_image
    from service.preprocess import to_model_input
    from service.repository import verify
    from service.runtime import ModelRuntime

    rt = ModelRuntime(verify(BUNDLE_DIR), intra)  # symguard's own session and options
    x1 = np.stack([to_model_input(decode_image(p, 10**7), rt.manifest.input) for p in digits_png(256)])
    out = {}
    with ThreadPoolExecutor(runs) as pool:
        for batch in (1, 32, 64, 256):
            x = np.ascontiguousarray(np.resize(x1, (batch, *x1.shape[1:])))
            rt.infer(x)  # warm
            t0 = time.perf_counter()

            def loop() -> int:
                n = 0
                while time.perf_counter() - t0 < seconds:
                    rt.infer(x)  # ONNX Runtime sessions take concurrent run() calls
                    n += batch
                return n

            done = sum(pool.map(lambda _: loop(), range(runs)))
            out[batch] = done / (time.perf_counter() - t0)
    return out


def fmt_rate(d: dict) -> str:
    return ", ".join(f"{b}: {v:,.0f}" for b, v in d.items())


# ---------------------------------------------------------------- report


def table(runs: list[Run], labels: dict[str, str]) -> str:
    lines = [
        "| scenario | system | requests | errors | images/s | p50 ms | p99 ms | server CPU % | server peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        extra = f" (think time {r.mean_delay_ms:.0f} ms)" if r.mean_delay_ms else ""
        extra += "" if r.steady else " ‡"
        lines.append(
            f"| {r.scenario}{extra} | {labels[r.system]} | {r.requests:,} | {r.errors} | {r.images_per_s:,.0f} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.cpu_pct:.0f} | {r.peak_rss_mb:.0f} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    import onnxruntime
    import torch

    return {
        "cores": os.cpu_count(), "cpu": model, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 s per run (about 3 minutes in all)")
    p.add_argument("--seconds", type=float, help="most seconds per run (default 25, --quick 5)")
    p.add_argument("--max-requests", type=int, default=100_000, help="most requests per run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--systems", default="ABC", help="which HTTP systems to run, e.g. AC")
    p.add_argument("--threads", type=int, default=2, help="compute threads per server (torch / ORT)")
    p.add_argument("--b-workers", type=int, help="BentoML model worker processes, --threads split among them "
                   "(default: one single-threaded worker per thread, C's layout; it beat 1 x 2 threads for B too)")
    p.add_argument("--c-processes", type=int, help="symguard server processes (default: one per thread, as B's "
                   "workers; each with --threads inference workers)")
    p.add_argument("--c-arg", action="append", default=[], help="extra `symguard serve` flag for C (repeatable)")
    p.add_argument("--skip-d", action="store_true", help="leave out D (for quick A/B runs of C's settings)")
    p.add_argument("--soak", type=int, default=0, help="after the table: N single-image requests to C, RSS over time")
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench")
    a = p.parse_args()
    seconds = a.seconds or (5.0 if a.quick else 25.0)
    t_start = time.perf_counter()
    info = machine()
    print(f"machine: {info}")

    # D first, with every server still down: the in-process limit and the FLOP count
    flops = count_graph(BUNDLE_DIR / "model.onnx")
    d = ort_limit(a.threads, 0.5 if a.skip_d else 2.0 if a.quick else 5.0)
    print(f"D: ONNX Runtime alone on {a.threads} threads, the better layout, images/s by batch size: {fmt_rate(d)}")
    print(f"graph: {flops.macs:,} MACs = {flops.flops / 1e6:.1f} MFLOP per image; at batch 256 that is "
          f"{d[256] * flops.flops / 1e9:.1f} GFLOP/s")  # fmt: skip

    wanted = dict(servers(a.threads, a.c_arg, a.b_workers or a.threads, a.c_processes or a.threads))
    if "A" in a.systems:
        print(naive_parity())
    if "B" in a.systems and not (BENTO_VENV / "bin/bentoml").exists():
        print(f"B skipped: no BentoML venv at {BENTO_VENV} (see bench/bento_service.py for the install)")
        a.systems = a.systems.replace("B", "")
    active = {k: s for k, s in wanted.items() if k in a.systems or k == "C"}
    labels = {k: s.label for k, s in active.items()}

    tmp = Path(tempfile.mkdtemp(prefix="symguard-bench-"))
    logs = a.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    singles = digits_png(512)
    batches = [multipart([singles[(32 * k + j) % len(singles)] for j in range(32)]) for k in range(64)]
    bodies = write_bodies(tmp, singles, batches)
    runs: list[Run] = []
    soak: dict = {}
    d_start = d_end = d
    try:
        for s in active.values():
            s.start(logs)
        for s in active.values():
            s.wait_ready()
            print(f"{s.label}: ready on {s.url}")
        print("same digit, |angle - symguard's| in degrees:", same_answers(active, singles[0]))
        for s in active.values():  # warm-up: allocators, BentoML's dispatcher training, ORT's first runs
            run_load(s, bodies, 1, 8, 3, 1000)
            run_load(s, bodies, 32, 2, 3, 100)

        order = list(active)
        k = 0
        for per in (1, 32):
            for conc in a.concurrency:
                rot = order[k % len(order) :] + order[: k % len(order)]
                k += 1
                for key in rot:
                    with stopped(others(active, key)):
                        # the same load for a few seconds first: an adaptive batcher (B's) re-learns the request
                        # pattern after its pause, instead of being measured while it does
                        run_load(active[key], bodies, per, conc, min(3.0, seconds), a.max_requests)
                        r = run_load(active[key], bodies, per, conc, seconds, a.max_requests)
                    runs.append(r)
                    print(f"  {r.scenario:<18} {key}: {r.images_per_s:8,.0f} img/s  p50 {r.p50_ms:7.1f} ms  "
                          f"p99 {r.p99_ms:7.1f} ms  cpu {r.cpu_pct:4.0f}%  rss {r.peak_rss_mb:5.0f} MB  "
                          f"errors {r.errors}  client cpu {r.client_cpu_pct:.0f}%{'' if r.steady else '  NOT STEADY'}",
                          flush=True)  # fmt: skip

        # p99 at half of C's peak single-image throughput: 8 connections with exponential think time
        peak = max(r.images_per_s for r in runs if r.system == "C" and r.per_request == 1)
        c1 = next(r for r in runs if r.system == "C" and r.per_request == 1 and r.concurrency == min(a.concurrency))
        delay = max(0.0, 1000.0 * 8 / (peak / 2) - c1.p50_ms)
        with stopped(others(active, "C")):
            half = run_load(active["C"], bodies, 1, 8, seconds, a.max_requests, think_ms=delay)
        half.scenario = f"1 img/req, 8 clients at ~half of C's peak ({peak:,.0f}/2)"
        runs.append(half)
        print(f"  half-peak: {half.images_per_s:,.0f} img/s, p50 {half.p50_ms:.1f} ms, p99 {half.p99_ms:.1f} ms")

        for s in active.values():
            s.wait_idle()
        with stopped(list(active.values())):
            d_end = ort_limit(a.threads, 0.5 if a.skip_d else 2.0 if a.quick else 5.0)
        print(f"D again after the HTTP runs: {fmt_rate(d_end)}")
        d_start = dict(d)
        d = {b: max(d_start[b], d_end[b]) for b in d}

        if a.soak:
            c = active["C"]
            rss = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(1.0):
                    rss.append(sum(p.memory_info().rss for p in c.tree()) / 2**20)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            r = run_load(c, bodies, 1, 8, 3600, a.soak)
            stop.set()
            th.join()
            soak = {"requests": r.requests, "errors": r.errors, "seconds": r.wall_s, "images_per_s": r.images_per_s,
                    "rss_mb_first": rss[0] if rss else None, "rss_mb_last": rss[-1] if rss else None,
                    "rss_mb_max": max(rss) if rss else None,
                    "rss_mb_by_decile": [rss[int(i * (len(rss) - 1) / 10)] for i in range(11)] if rss else []}  # fmt: skip
            print(f"soak: {soak}")
    finally:
        for s in active.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(table(runs, labels))
    print("‡ no steady window: the time ran out before every client had an answer; rate over the whole run")
    get = {(r.system, r.per_request, r.concurrency): r for r in runs if not r.mean_delay_ms}
    ratios = {}
    for per in (1, 32):
        for conc in a.concurrency:
            c = get[("C", per, conc)].images_per_s
            for other in ("A", "B"):
                if (other, per, conc) in get and get[(other, per, conc)].images_per_s > 0:
                    ratios[f"C/{other} {per} img/req x {conc}"] = c / get[(other, per, conc)].images_per_s
    best_c32 = max(get[("C", 32, c)].images_per_s for c in a.concurrency)
    ratios["C/D (best C at 32 img/req vs D at batch 32)"] = best_c32 / d[32]
    ratios["C/D (best C at 32 img/req vs D's best batch)"] = best_c32 / max(d.values())
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    print(f"D: {', '.join(f'batch {b}: {v:,.0f} img/s' for b, v in d.items())}; "
          f"{flops.flops / 1e6:.1f} MFLOP/image -> {max(d.values()) * flops.flops / 1e9:.1f} GFLOP/s at the best batch")  # fmt: skip
    print(f"total wall {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()}")

    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "machine": info, "args": {k: str(v) for k, v in vars(a).items()}, "seconds_per_run": seconds,
        "flops_per_image": flops.flops, "macs_by_op": flops.macs_by_op, "ort_images_per_s_by_batch": d,
        "ort_images_per_s_by_batch_start": d_start, "ort_images_per_s_by_batch_end": d_end,
        "runs": [asdict(r) for r in runs], "ratios": ratios, "soak": soak, "labels": labels,
        "load_average_at_end": os.getloadavg(),
    }, indent=1))  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
