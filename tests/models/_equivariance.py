"""Shared check for encoders: how an encoder's outputs for g·x must relate to its outputs for x (g in D4)."""

from __future__ import annotations

import numpy as np
import torch

from service.geometry import compose


def assert_outputs_follow(g: tuple[int, bool], base: tuple[torch.Tensor, ...], moved: tuple[torch.Tensor, ...],
                          atol: float) -> None:  # fmt: skip
    """base = (embedding, pose, reflection logit) of x, moved = the same of g·x: the embedding is invariant, the
    reflection logit changes sign under a mirror, and the pose composes with g as service/geometry.py says."""
    (emb, pose, logit), (e2, p2, l2) = base, moved
    k, f = g
    angle = np.degrees(np.arctan2(pose[:, 1].numpy(), pose[:, 0].numpy()))
    a2 = np.degrees(np.arctan2(p2[:, 1].numpy(), p2[:, 0].numpy()))
    assert torch.allclose(e2, emb, atol=atol)
    assert torch.allclose(l2, -logit if f else logit, atol=atol)
    for i in range(len(pose)):
        want_a, want_m = compose((90.0 * k, f), (float(angle[i]), bool(logit[i] > 0)))
        assert abs((a2[i] - want_a + 180) % 360 - 180) < 1e-2
        assert bool(l2[i] > 0) == want_m
