"""The identity pull on cyclic data: why cyclic specs train with a 4-fold pull (models/train.py gauge_pull)."""

from __future__ import annotations

import math

import torch

from models.train import gauge_pull


def _orbit_loss(psi0: torch.Tensor, order: int) -> torch.Tensor:
    """Pull summed over a C4 orbit: an exactly equivariant network gives its four quarter turns ψ0 + 90°·j."""
    angles = psi0 + torch.arange(4) * (math.pi / 2)
    z = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    p = torch.zeros(4)
    # the batch is [x; R_δ x]: here only the x half matters, so the copies are the same poses with δ = 0
    return gauge_pull(torch.cat([z, z]), torch.cat([z, z]), torch.cat([p, p]), torch.zeros(4), order)


def test_plain_pull_gives_no_gradient_on_a_c4_orbit_but_the_4_fold_pull_does():
    for order, has_gradient in ((1, False), (4, True)):
        psi0 = torch.tensor(0.3, requires_grad=True)
        _orbit_loss(psi0, order).backward()
        assert (abs(float(psi0.grad)) > 1e-3) == has_gradient, (order, float(psi0.grad))


def test_4_fold_pull_is_zero_at_every_quarter_turn_and_largest_between():
    at = lambda deg: float(_orbit_loss(torch.tensor(math.radians(deg)), 4))  # noqa: E731
    assert at(0.0) < 1e-6 and at(90.0) < 1e-6 and at(-180.0) < 1e-6
    assert at(45.0) > 1.9  # 1 - cos(180°) = 2 for every member of the orbit


def test_order_1_is_the_anchor_pull():
    z = torch.randn(6, 2)
    p = torch.rand(6)
    delta = torch.rand(3) * 6 - 3
    w = torch.randn(6, 2)
    # the general path at order 1 agrees with the unit-vector formula used for order 1
    angle = lambda v: torch.atan2(v[:, 1], v[:, 0])  # noqa: E731
    target = torch.cat([torch.zeros(3), delta])
    ref = ((1 - p) * (1 - torch.cos(angle(z) - target)) + p * (1 - torch.cos(angle(w) - target))).mean()
    assert torch.allclose(gauge_pull(z, w, p, delta, 1), ref, atol=1e-5)
