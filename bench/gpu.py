"""The comparison's D and C on a GPU machine, with ONNX Runtime's CUDA execution provider (BENCHMARKS.md "GPU").

    python bench/gpu.py --out DIR            # needs onnxruntime-gpu whose CUDA provider really loads

D: the shipped graph in process on CUDA, by batch size, two ways: plain `session.run` (numpy in and out, so each
call copies the batch to the GPU and the outputs back) and with I/O binding (the batch already on the GPU, outputs
left there), which is the GPU's own rate. C: `symguard serve --require-cuda` over HTTP on 127.0.0.1, closed loop
from bench/loadgen.py, and what bounds it: the server's inference time from its own metrics against the wall time,
and decode + preprocess alone in process on one core (the rate one Python thread can feed the GPU). Writes
gpu.json to --out and prints the same figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.compare import BUNDLE_DIR, BUNDLE_REF, PY, Server, run_load, write_bodies  # noqa: E402
from bench.workload import digits_png, multipart  # noqa: E402
from service.inputs import Encoded, prepare_batch  # noqa: E402
from service.repository import verify  # noqa: E402
from service.runtime import ModelRuntime  # noqa: E402

BATCHES = (1, 32, 256, 1024, 4096)


def rate(fn, images: int, seconds: float) -> float:
    fn()  # warm: CUDA kernels, cuDNN algorithm search, memory arena
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += images
    return n / (time.perf_counter() - t0)


def d_gpu(seconds: float) -> dict:
    rt = ModelRuntime(verify(BUNDLE_DIR), 1, require_cuda=True)
    spec = rt.manifest.input
    x1 = prepare_batch([Encoded(p, "digit") for p in digits_png(256)], spec, 10**7)
    out: dict = {"provider": rt.provider, "plain": {}, "io_binding": {}}
    for batch in BATCHES:
        x = np.ascontiguousarray(np.resize(x1, (batch, *x1.shape[1:])))
        out["plain"][batch] = rate(lambda: rt.infer(x), batch, seconds)
        io = rt.session.io_binding()
        io.bind_ortvalue_input(spec.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        for name in rt.outputs:
            io.bind_output(name, "cuda")
        out["io_binding"][batch] = rate(lambda: rt.session.run_with_iobinding(io), batch, seconds)
        print(f"D on {rt.provider}, batch {batch}: plain {out['plain'][batch]:,.0f} img/s, "
              f"I/O binding {out['io_binding'][batch]:,.0f} img/s", flush=True)  # fmt: skip
    return out


def decode_rate(seconds: float) -> float:
    """Decode + preprocess of single 28x28 PNGs, one thread: images/s."""
    spec = ModelRuntime(verify(BUNDLE_DIR), 1).manifest.input
    pngs = [Encoded(p, "digit") for p in digits_png(64)]
    k = iter(range(10**12))
    return rate(lambda: prepare_batch([pngs[next(k) % 64]], spec, 10**7), 1, seconds)


def counters(url: str) -> tuple[float, float, float]:
    """(inference seconds, images, session.runs) so far, from the server's own metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text

    def value(name: str) -> float:
        m = re.search(rf'{name}\{{model="[^"]+"\}} (\S+)', text)
        return float(m.group(1)) if m else 0.0

    return (value("symguard_inference_duration_seconds_sum"), value("symguard_batch_size_sum"),
            value("symguard_batch_size_count"))  # fmt: skip


def c_http(seconds: float, max_batch: int, workers: int, log_dir: Path) -> list[dict]:
    c = Server("C", "C symguard serve (CUDA)", [
        PY, "-m", "service.cli", "serve", "--model", BUNDLE_REF, "--port", "{port}", "--log-level", "warning",
        "--require-cuda", "--max-batch", str(max_batch), "--inference-workers", str(workers), "--max-images", "64",
    ])  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="symguard-gpu-"))
    singles = digits_png(512)
    bodies = write_bodies(tmp, singles, [multipart([singles[(32 * k + j) % 512] for j in range(32)]) for k in range(64)])
    c.start(log_dir)
    runs = []
    try:
        c.wait_ready()
        for per, conc in ((1, 64), (1, 256), (32, 8), (32, 64)):
            run_load(c, bodies, per, conc, 3, 100_000)  # warm-up
            before, t0 = counters(c.url), time.perf_counter()
            r = run_load(c, bodies, per, conc, seconds, 1_000_000)
            after = counters(c.url)
            busy = (after[0] - before[0]) / (time.perf_counter() - t0)
            mean_batch = (after[1] - before[1]) / max(1.0, after[2] - before[2])
            row = {"scenario": r.scenario, "images_per_s": r.images_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                   "server_cpu_pct": r.cpu_pct, "rss_mb": r.peak_rss_mb, "errors": r.errors,
                   "inference_busy": busy, "mean_batch": mean_batch, "workers": workers,
                   "client_cpu_pct": r.client_cpu_pct}  # fmt: skip
            runs.append(row)
            print(f"C {r.scenario}: {r.images_per_s:,.0f} img/s p50 {r.p50_ms:.1f} ms p99 {r.p99_ms:.1f} ms "
                  f"server cpu {r.cpu_pct:.0f}% inference busy {busy:.2f} (worker-seconds per second) "
                  f"mean batch {mean_batch:.1f} workers {workers} errors {r.errors}", flush=True)  # fmt: skip
    finally:
        c.stop()
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench")
    p.add_argument("--seconds", type=float, default=3.0, help="per D measurement")
    p.add_argument("--http-seconds", type=float, default=15.0, help="per HTTP scenario")
    p.add_argument("--max-batch", type=int, default=256, help="C's max_batch on the GPU")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="C's inference workers, one server each")
    p.add_argument("--skip-d", action="store_true", help="HTTP only")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers()}
    print(result, flush=True)
    if not a.skip_d:
        result["d"] = d_gpu(a.seconds)
        result["decode_preprocess_images_per_s_one_thread"] = decode_rate(a.seconds)
        print(f"decode + preprocess, one thread: {result['decode_preprocess_images_per_s_one_thread']:,.0f} img/s")
    result["c"] = [row for w in a.workers for row in c_http(a.http_seconds, a.max_batch, w, a.out)]
    result["c_settings"] = {"max_batch": a.max_batch}
    (a.out / "gpu.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
