"""Pseudo-labels for the symmetry level: the spread of poses among each input's nearest neighbours.

Neighbours are found in the invariant embedding, so an input's neighbours are the same shape in other poses.
Memory is O(N·k): distances are computed one chunk of queries at a time, never as a dense N×N matrix.
"""

from __future__ import annotations

import math

import torch


def knn(x: torch.Tensor, k: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours (self included) of every row of x. -> (indices [N,k], distances [N,k])."""
    k = min(k, len(x))
    sq = (x * x).sum(1)
    idx, dist = torch.empty(len(x), k, dtype=torch.long), torch.empty(len(x), k)
    for i in range(0, len(x), chunk):
        q = x[i : i + chunk]
        d2 = (sq[i : i + chunk, None] - 2.0 * q @ x.T + sq[None, :]).clamp_min_(0.0)  # [chunk, N], freed each loop
        d, j = torch.topk(d2, k, dim=1, largest=False)
        idx[i : i + chunk], dist[i : i + chunk] = j, d.sqrt()
    return idx, dist


def level_from_angles(abs_angles: torch.Tensor, keep: torch.Tensor, family: str) -> torch.Tensor:
    """Width estimate from |ψ| of the kept neighbours: uniform U(-θ,θ) has E|ψ| = θ/2; a half-normal has E|ψ| = σ√(2/π)."""
    mean_abs = (abs_angles * keep).sum(1) / keep.sum(1).clamp_min(1)
    if family == "gaussian":
        return mean_abs * math.sqrt(math.pi / 2.0)
    return 2.0 * mean_abs


def knn_pseudo_labels(
    emb: torch.Tensor, angle_deg: torch.Tensor, reflection_logit: torch.Tensor, k: int = 32, family: str = "uniform",
    outlier_quantile: float = 0.98,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (labels [N,2] = (width in degrees, reflection rate), mask [N] of inputs to train on).

    Outliers are masked, not zeroed: a neighbour whose |ψ| sits far above the rest of its neighbourhood (robust
    median + 5·MAD rule) is left out of that average, and an input whose neighbourhood is unusually far away in the
    embedding (top 1 - outlier_quantile of mean distance) gets no label at all rather than a wrong one.
    """
    idx, dist = knn(emb, k)
    a = angle_deg.abs()[idx]  # [N, k]
    med = a.median(dim=1, keepdim=True).values
    mad = (a - med).abs().median(dim=1, keepdim=True).values
    keep = (a <= med + 5.0 * mad + 1.0).float()
    width = level_from_angles(a, keep, family).clamp(0.0, 180.0)
    rate = (reflection_logit[idx] > 0).float().mean(1)
    spread = dist[:, 1:].mean(1) if dist.shape[1] > 1 else dist[:, 0]
    mask = spread <= torch.quantile(spread, outlier_quantile)
    return torch.stack([width, rate], dim=1), mask
