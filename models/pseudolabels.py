"""Pseudo-labels for the symmetry level: the spread of poses among each input's nearest neighbours.

Neighbours are found in the invariant embedding, so an input's neighbours are the same shape in other poses.
Memory is O(N·k): distances are computed one chunk of queries at a time, never as a dense N×N matrix. Past
EXACT_MAX_N inputs an HNSW index (faiss) replaces the exact search, whose time grows as N².
"""

from __future__ import annotations

import numpy as np
import torch


EXACT_MAX_N = 200_000  # above this, "auto" uses an HNSW index: the exact search's O(N²) time is hours at 10⁶


def knn(x: torch.Tensor, k: int, chunk: int = 2048, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours (self included) of every row of x. -> (indices [N,k], distances [N,k]).

    exact: chunked brute force, O(N·(chunk + k)) memory. hnsw: a faiss HNSW graph, O(N·(dim + M)) memory and
    roughly N·log N time, approximate (bench/bench_knn.py measures its recall). auto: exact up to EXACT_MAX_N rows.
    """
    if method == "auto":
        method = "exact" if len(x) <= EXACT_MAX_N else "hnsw"
    if method == "hnsw":
        return _knn_hnsw(x, k, chunk)
    if method != "exact":
        raise ValueError(f"knn method must be auto, exact or hnsw, not {method!r}")
    k = min(k, len(x))
    sq = (x * x).sum(1)
    idx, dist = torch.empty(len(x), k, dtype=torch.long), torch.empty(len(x), k)
    for i in range(0, len(x), chunk):
        q = x[i : i + chunk]
        d2 = (sq[i : i + chunk, None] - 2.0 * q @ x.T + sq[None, :]).clamp_min_(0.0)  # [chunk, N], freed each loop
        d, j = torch.topk(d2, k, dim=1, largest=False)
        idx[i : i + chunk], dist[i : i + chunk] = j, d.sqrt()
    return idx, dist


HNSW_LINKS = 32  # M: neighbours per node in the graph; 32 is faiss's usual choice for ~32-dim data
HNSW_EF_CONSTRUCTION = 64


def _knn_hnsw(x: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss  # optional: only needed for inputs above EXACT_MAX_N (the train extra installs it)
    except ImportError as e:
        raise RuntimeError("knn method 'hnsw' needs faiss-cpu: pip install 'symguard[train]'") from e
    k = min(k, len(x))
    data = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
    index = faiss.IndexHNSWFlat(data.shape[1], HNSW_LINKS)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(data)
    index.hnsw.efSearch = max(2 * k, 64)  # the candidate list must hold at least k
    idx, dist = torch.empty(len(x), k, dtype=torch.long), torch.empty(len(x), k)
    step = max(chunk, 16_384)
    for i in range(0, len(x), step):
        d2, j = index.search(data[i : i + step], k)
        idx[i : i + step], dist[i : i + step] = torch.from_numpy(j), torch.from_numpy(d2).clamp_min_(0.0).sqrt_()
    return idx, dist


def level_from_angles(abs_angles: torch.Tensor, keep: torch.Tensor, family: str) -> torch.Tensor:
    """Width estimate from |ψ| of the kept neighbours, through the median: U(-θ,θ) has median |ψ| = θ/2, and a
    half-normal has median |ψ| = 0.6745σ. The mean (E|ψ| = θ/2, σ√(2/π)) estimates the same widths, but pose
    errors are heavy-tailed (a wrong "which way is up" is off by 90° or more): on v2's poses the mean read most
    classes' widths 15-70° higher than the median did (models/RESULTS.md)."""
    a = torch.where(keep.bool(), abs_angles, torch.nan)
    med = a.nanmedian(dim=1).values.nan_to_num(0.0)
    if family == "gaussian":
        return med / 0.6745
    return 2.0 * med


def _von_mises_density(centres_deg: torch.Tensor, grid_deg: torch.Tensor, kappa: float) -> torch.Tensor:
    """Sum of von Mises bumps at `centres_deg` [..., m], evaluated on `grid_deg` [B] and normalised over the grid."""
    d = torch.deg2rad(grid_deg[None, :] - centres_deg[..., :, None])  # [..., m, B]
    dens = torch.exp(kappa * (torch.cos(d) - 1.0)).sum(-2)
    return dens / dens.sum(-1, keepdim=True)


def cyclic_order(angles_deg: torch.Tensor, max_order: int = 8, kappa: float = 30.0, bins: int = 72) -> torch.Tensor:
    """The order n of the cyclic group C_n whose template best explains each row of neighbour angles [N, k].

    Each row's angles become a smoothed density on a circle grid; C_n's template is the same kernel at the n
    multiples of 360°/n. The order is argmin_n KL(row || template_n): a template that puts mass where the row has
    none (C2 for C4 data) pays for the row's mass it misses, and one wider than needed (C4 for C2 data) pays
    log(4/2) for spreading. kappa = 30 is a kernel of about 10° standard deviation, the pose error's scale."""
    grid = torch.arange(bins, dtype=torch.float32) * (360.0 / bins)
    p = _von_mises_density(angles_deg.float(), grid, kappa).clamp_min(1e-12)  # [N, B]
    kl = []
    for n in range(1, max_order + 1):
        t = _von_mises_density(torch.arange(n, dtype=torch.float32) * (360.0 / n), grid, kappa).clamp_min(1e-12)
        kl.append((p * (p.log() - t.log())).sum(-1))
    return torch.stack(kl, 1).argmin(1) + 1


def knn_pseudo_labels(
    emb: torch.Tensor, angle_deg: torch.Tensor, reflection_logit: torch.Tensor, k: int = 32, family: str = "uniform",
    outlier_quantile: float = 0.98, knn_method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (labels [N,2] = (width in degrees, reflection rate), mask [N] of inputs to train on).

    The width is the half-width θ (uniform), σ (gaussian), or half the period of C_n, 180°/n (cyclic).

    Outliers are masked, not zeroed: a neighbour whose |ψ| sits far above the rest of its neighbourhood (robust
    median + 5·MAD rule) is left out of that average, and an input whose neighbourhood is unusually far away in the
    embedding (top 1 - outlier_quantile of mean distance) gets no label at all rather than a wrong one.
    """
    idx, dist = knn(emb, k, method=knn_method)
    if family == "cyclic":  # the level is half the group's period, 180°/n, n from KL to the C_1..C_8 templates
        width = 180.0 / cyclic_order(angle_deg[idx]).float()
    else:
        a = angle_deg.abs()[idx]  # [N, k]
        med = a.median(dim=1, keepdim=True).values
        mad = (a - med).abs().median(dim=1, keepdim=True).values
        keep = (a <= med + 5.0 * mad + 1.0).float()
        width = level_from_angles(a, keep, family).clamp(0.0, 180.0)
    rate = (reflection_logit[idx] > 0).float().mean(1)
    spread = dist[:, 1:].mean(1) if dist.shape[1] > 1 else dist[:, 0]
    mask = spread <= torch.quantile(spread, outlier_quantile)
    return torch.stack([width, rate], dim=1), mask
