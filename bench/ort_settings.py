"""ONNX Runtime settings for the default bundle, in process: graph x optimisation level x intra-op threads x batch,
interleaved round-robin over --rounds rounds, so drift on a shared machine hits every setting alike; prints the
median images/s per setting (and the spread).

    .venv/bin/python bench/ort_settings.py --rounds 5 --seconds 1
    .venv/bin/python bench/ort_settings.py --graphs old.onnx new.onnx --levels all --threads 2   # two graphs
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRAPH = ROOT / "models/repository/mnist-multiple-flip/8/model.onnx"
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # symguard's setting
}


def session(level: str, threads: int, spin: bool, graph: Path = GRAPH) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.graph_optimization_level = LEVELS[level]
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(graph), o, providers=["CPUExecutionProvider"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--levels", nargs="+", default=list(LEVELS))
    p.add_argument("--graphs", type=Path, nargs="+", default=[GRAPH], help="ONNX files with the default's input")
    a = p.parse_args()
    from bench.workload import digits_png
    from service.decode import decode_image
    from service.manifest import Manifest
    from service.preprocess import to_model_input

    spec = Manifest.model_validate_json((GRAPH.parent / "manifest.json").read_text()).input
    xs = np.stack([to_model_input(decode_image(b, 10**7), spec) for b in digits_png(max(a.batch))])
    configs = list(itertools.product(range(len(a.graphs)), a.levels, a.threads, a.batch))
    sessions = {(g, lv, th): session(lv, th, False, a.graphs[g]) for g, lv, th, _ in configs}
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(a.rounds):
        for g, lv, th, b in configs:
            s, x = sessions[(g, lv, th)], xs[:b]
            s.run(None, {"image": x})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < a.seconds:
                s.run(None, {"image": x})
                n += b
            rates[(g, lv, th, b)].append(n / (time.perf_counter() - t0))
    for g, graph in enumerate(a.graphs):
        print(f"graph {g}: {graph}")
    head = f"{'graph':>5} {'level':<9} {'threads':>7} {'batch':>5} {'median img/s':>12}"
    print(f"{head}  min..max over {a.rounds} rounds")
    for (g, lv, th, b), r in rates.items():
        print(f"{g:>5} {lv:<9} {th:>7} {b:>5} {statistics.median(r):>12,.0f}  {min(r):,.0f}..{max(r):,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
