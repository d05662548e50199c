"""Pseudo-labelling's k nearest neighbours at scale: `models.pseudolabels.knn` on N random embeddings.

    .venv/bin/python bench/bench_knn.py --n 100000                       # the whole call, default chunk (2048)
    .venv/bin/python bench/bench_knn.py --n 1000000 --chunk 256 --chunks 16   # the first 16 query chunks only
    .venv/bin/python bench/bench_knn.py --n 100000 1000000 --method hnsw      # faiss HNSW, with recall@k

Each measurement runs in a fresh child process so its peak RSS (ru_maxrss) is its own. Dimension and k default to
the default spec's training settings (models/train.py TrainConfig: embed_dim 32, knn 32).

`--chunks M` stops the real `knn` after M query chunks (by counting its torch.topk calls) and reports the time
per chunk and the time for all ceil(N/chunk) chunks extrapolated from it, labelled as such: the whole 1M x 1M
search is ~3.2e13 multiply-adds plus a top-k over 1e12 distances, most of an hour on two shared cores. Peak memory
does not depend on how many chunks run: every chunk allocates the same [chunk, N] distance block.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Enough(Exception):
    pass


def recall_at_k(x, idx, k: int, queries: int = 1000) -> float:
    """Share of the exact k nearest neighbours that `idx` holds, over `queries` random rows (brute force, 100 at
    a time)."""
    import torch

    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:queries]
    hits = 0
    for part in rows.split(100):
        exact = torch.topk(torch.cdist(x[part], x), k, largest=False).indices
        hits += sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, idx[part]))
    return hits / (len(rows) * k)


def child(n: int, dim: int, k: int, chunk: int, chunks: int, threads: int, method: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from models import pseudolabels

    torch.set_num_threads(threads)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    real_topk, calls = torch.topk, [0]

    def counting_topk(*args, **kwargs):
        if chunks and calls[0] >= chunks:
            raise _Enough
        calls[0] += 1
        return real_topk(*args, **kwargs)

    pseudolabels.torch.topk = counting_topk  # the module's own `torch` is the global one: only in this child
    if method == "hnsw":
        import faiss

        faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        idx, _ = pseudolabels.knn(x, k, chunk=chunk, method=method)
        complete = True
    except _Enough:
        complete = False
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pseudolabels.torch.topk = real_topk
    recall = recall_at_k(x, idx, k) if method == "hnsw" else 1.0
    total_chunks = math.ceil(n / chunk)
    return {
        "n": n, "dim": dim, "k": k, "method": method, "recall_at_k": recall, "chunk": chunk, "threads": threads,
        "complete": complete,
        "chunks_run": calls[0], "chunks_total": total_chunks, "wall_s": wall,
        "wall_s_all_chunks": wall if complete else wall / calls[0] * total_chunks,
        "peak_rss_mb": peak, "rss_mb_after_data": rss_data,
        "distance_block_mb": chunk * n * 4 / 2**20, "result_mb": n * k * (8 + 4) / 2**20,
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--chunk", type=int, default=2048, help="query rows per chunk (knn's default: 2048)")
    p.add_argument("--chunks", type=int, default=0, help="stop after this many chunks (0: run them all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", choices=["exact", "hnsw"], default="exact", help="knn's search (hnsw: faiss)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.n[0], a.dim, a.k, a.chunk, a.chunks, a.threads, a.method)))
        return 0
    for n in a.n:
        cmd = [sys.executable, __file__, "--child", "--n", str(n), "--dim", str(a.dim), "--k", str(a.k),
               "--chunk", str(a.chunk), "--chunks", str(a.chunks), "--threads", str(a.threads),
               "--method", a.method]  # fmt: skip
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        how = "measured" if r["complete"] else f"{r['chunks_run']} of {r['chunks_total']} chunks measured, extrapolated"
        parts = (f"one [chunk, N] float32 block {r['distance_block_mb']:,.0f} MB; " if a.method == "exact" else "")
        print(f"N={n:,} dim={a.dim} k={a.k} {a.method} chunk={a.chunk}: {r['wall_s_all_chunks']:.1f} s ({how}; "
              f"{r['wall_s']:.1f} s run), peak RSS {r['peak_rss_mb']:,.0f} MB (embeddings loaded: "
              f"{r['rss_mb_after_data']:,.0f} MB; {parts}the [N, k] result {r['result_mb']:,.0f} MB), "
              f"recall@k {r['recall_at_k']:.3f}")  # fmt: skip
        print("  " + json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
