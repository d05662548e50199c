"""Equivariance is tested, not assumed: every layer, numerically, on random inputs (as escnn's tests do)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.networks import D4, N_G, Encoder, GroupConv, LiftingConv, _IDX, _inv, _mul, block, plane_matrix, rotate
from _equivariance import assert_outputs_follow
from service.geometry import apply_d4


def _regular_act(y: torch.Tensor, g) -> torch.Tensor:
    """g acting on regular fields [N, C*8, H, W]: move space by g and permute the group axis by h -> g h."""
    n, c8, h, w = y.shape
    y = y.view(n, c8 // N_G, N_G, h, w)
    out = torch.empty_like(y)
    for i, hh in enumerate(D4):
        out[:, :, _IDX[_mul(g, hh)]] = y[:, :, i]
    return torch.from_numpy(apply_d4(out.numpy(), *g)).view(n, c8, h, w)


def test_group_law_matches_image_action():
    x = np.arange(49.0).reshape(7, 7)
    for g in D4:
        for h in D4:
            lhs = apply_d4(apply_d4(x, *h), *g)
            assert np.array_equal(lhs, apply_d4(x, *_mul(g, h)))
        assert np.array_equal(apply_d4(apply_d4(x, *g), *_inv(g)), x)


def test_plane_matrix_matches_pixel_motion():
    """A bright pixel right of centre moves where ρ(g) sends the vector (1, 0) (x right, y up)."""
    for g in D4:
        img = np.zeros((5, 5))
        img[2, 3] = 1.0
        r, c = np.argwhere(apply_d4(img, *g))[0]
        assert np.allclose(plane_matrix(g) @ [1.0, 0.0], [c - 2, 2 - r])


@pytest.mark.parametrize("size,stride", [(29, 1), (29, 2), (15, 2)])
def test_lifting_and_group_conv_are_exactly_equivariant(size, stride):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    lift, gconv = LiftingConv(3, 4, 5, stride), GroupConv(4, 2, 3, stride)
    with torch.no_grad():
        for g in D4:
            gx = torch.from_numpy(apply_d4(x.numpy(), *g))
            assert torch.allclose(lift(gx), _regular_act(lift(x), g), atol=1e-5)
            y = torch.randn(2, 4 * N_G, size, size)
            gy = _regular_act(y, g)
            assert torch.allclose(gconv(gy), _regular_act(gconv(y), g), atol=1e-5)


def test_even_size_with_stride_two_is_not_equivariant():
    """Why the input is 29x29: the same layer on an even grid breaks exactness (the 'one pixel decides it' fact)."""
    torch.manual_seed(0)
    lift = LiftingConv(1, 4, 3, stride=2)
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        gx = torch.from_numpy(apply_d4(x.numpy(), 1, False))
        assert (lift(gx) - _regular_act(lift(x), (1, False))).abs().max() > 1e-2


@pytest.mark.parametrize("pose_hidden", [0, 8], ids=["linear-pose-field", "mlp-pose-head"])
def test_encoder_pose_moves_with_the_group_and_embedding_is_invariant(pose_hidden: int):
    torch.manual_seed(1)
    enc = Encoder((4, 8, 8), 16, pose_hidden=pose_hidden).eval()
    x = torch.rand(6, 1, 29, 29)
    with torch.no_grad():
        base = enc(x)[:3]
        for g in D4:
            assert_outputs_follow(g, base, enc(torch.from_numpy(apply_d4(x.numpy(), *g)))[:3], atol=1e-5)


def test_rotate_is_counter_clockwise_like_rot90():
    x = torch.rand(3, 1, 29, 29)
    one, zero = torch.ones(3), torch.zeros(3)
    assert torch.allclose(rotate(x, zero, one), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)


def test_eval_block_folds_the_norm_into_the_conv_without_changing_the_output():
    torch.manual_seed(3)
    blk = block(4, 6, 3, 2)
    blk.train()
    for _ in range(3):  # give the running statistics something other than their initial values
        blk(torch.randn(8, 4 * N_G, 15, 15) * 2 + 0.5)
    blk.eval()
    x = torch.randn(5, 4 * N_G, 15, 15)
    conv, norm, act = blk
    with torch.no_grad():
        unfolded = act(norm(conv(x)))
        folded = blk(x)
    assert unfolded.abs().max() > 0.1
    assert torch.allclose(folded, unfolded, atol=1e-5)
