"""The polar pose posterior is tested, not assumed: exact for quarter turns and mirrors, shift-equivariant on
its polar grid, and its pose follows the group law of service/geometry.py on real inputs."""

from __future__ import annotations

import math

import pytest
import torch

from models.networks import D4
from models.polar import (
    MIRROR,
    MirrorConv,
    PolarEncoder,
    identity_surprise,
    mode_vector,
    polar_matrix,
    pose_target,
    reverse_angles,
)
from _equivariance import assert_outputs_follow
from service.geometry import apply_d4


def _act(y: torch.Tensor, shift: int, mirrored: bool) -> torch.Tensor:
    """The group acting on mirror-regular fields [N, C*2, R, A]: reverse the angles and swap halves, then shift."""
    if mirrored:
        n, c2, r, a = y.shape
        y = reverse_angles(y.view(n, c2 // MIRROR, MIRROR, r, a).flip(2)).view(n, c2, r, a)
    return torch.roll(y, shift, -1)


@pytest.mark.parametrize("lifting", [True, False])
@pytest.mark.parametrize("dilation", [1, 3])
def test_mirror_conv_commutes_with_shifts_and_reversals(lifting: bool, dilation: int):
    torch.manual_seed(0)
    conv = MirrorConv(3, 4, (3, 5), stride=2, dilation=dilation, lifting=lifting)
    x = torch.randn(2, 3 if lifting else 6, 9, 32)
    with torch.no_grad():
        for shift in (0, 1, 7):
            for mirrored in (False, True):
                if lifting:
                    gx = torch.roll(reverse_angles(x) if mirrored else x, shift, -1)
                else:
                    gx = _act(x, shift, mirrored)
                assert torch.allclose(conv(gx), _act(conv(x), shift, mirrored), atol=1e-5)


def test_polar_grid_turns_quarter_turns_and_mirrors_into_exact_shifts():
    s, r, a = 29, 8, 64
    p = polar_matrix(s, r, a)
    img = torch.rand(s * s, dtype=torch.float64)
    base = (p.double() @ img).view(r, a)
    rot = (p.double() @ torch.from_numpy(apply_d4(img.view(s, s).numpy(), 1, False).copy()).flatten()).view(r, a)
    assert torch.allclose(rot, torch.roll(base, a // 4, -1), atol=1e-6)  # a quarter turn CCW: +A/4 bins
    mir = (p.double() @ torch.from_numpy(apply_d4(img.view(s, s).numpy(), 0, True).copy()).flatten()).view(r, a)
    assert torch.allclose(mir, torch.roll(reverse_angles(base), a // 2, -1), atol=1e-6)  # θ -> 180° - θ


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval-folded", "train"])
def test_encoder_pose_moves_with_the_group_and_embedding_is_invariant(train_mode: bool):
    torch.manual_seed(1)
    enc = PolarEncoder((4, 8, 8, 8), 8, 16)
    enc.train(train_mode)
    x = torch.rand(6, 1, 29, 29)
    # in train mode the norms use batch statistics: compare batches that hold the same images twice
    run = (lambda b: tuple(t[len(b) :] for t in enc(torch.cat([b, b]))[:3])) if train_mode else (lambda b: enc(b)[:3])
    with torch.no_grad():
        base = run(x)
        for g in D4:
            assert_outputs_follow(g, base, run(torch.from_numpy(apply_d4(x.numpy(), *g).copy())), atol=1e-4)


def test_identity_surprise_is_zero_at_the_mode_and_grows_away_from_it():
    logp = torch.log_softmax(torch.randn(3, MIRROR, 16), dim=-1)
    logp[0, 0, 0] = logp[0].max() + 1.0
    s = identity_surprise(logp)
    assert s[0] == 0 and (s[1:] > 0).all()


def test_pose_target_splits_between_the_nearest_bins():
    t = pose_target(torch.tensor([0.0, 2 * math.pi / 64 * 2.25, -2 * math.pi / 64 * 0.5]), 64)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert t[0, 0] == 1
    assert torch.isclose(t[1, 2], torch.tensor(0.75)) and torch.isclose(t[1, 3], torch.tensor(0.25))
    assert torch.isclose(t[2, 63], torch.tensor(0.5)) and torch.isclose(t[2, 0], torch.tensor(0.5))


def test_mode_vector_reads_one_mode_of_a_cyclic_posterior():
    """C4 data gives four equal modes: their circular mean is ~0 (no pose), the mode reading lands on one of them."""
    a = 64
    ring = torch.stack([torch.cos(torch.arange(a) * 2 * math.pi / a), torch.sin(torch.arange(a) * 2 * math.pi / a)], 1)
    q = torch.zeros(1, a)
    for m in range(4):
        q[0, (5 + 16 * m - 1) % a], q[0, 5 + 16 * m], q[0, (5 + 16 * m + 1) % a] = 0.05, 0.15 + 0.01 * (m == 2), 0.05
    q = q / q.sum()
    assert (q @ ring).norm() < 0.02
    v = mode_vector(q, ring)[0]
    miss = math.degrees(math.atan2(v[1], v[0])) - (5 + 32) * 360 / a  # the highest mode is bin 37
    assert abs((miss + 180) % 360 - 180) < 0.5


def test_cyclic_encoder_pose_is_exact_for_quarter_turns():
    torch.manual_seed(2)
    enc = PolarEncoder((4, 8, 8, 8), 8, 16).eval()
    enc.pose_at_mode = True
    x = torch.rand(4, 1, 29, 29)
    with torch.no_grad():
        _, pose, logit, _ = enc(x)
        _, p2, l2, _ = enc(torch.rot90(x, 1, (2, 3)))
    a1 = torch.rad2deg(torch.atan2(pose[:, 1], pose[:, 0]))
    a2 = torch.rad2deg(torch.atan2(p2[:, 1], p2[:, 0]))
    assert torch.allclose(torch.remainder(a2 - a1 - 90 + 180, 360) - 180, torch.zeros(4), atol=1e-2)


def test_posed_polar_samples_are_the_turned_images_samples_read_off_the_source(digits):
    """Training draws are sampled at turned grid points (sample_polar_posed): at no turn they are the graph's own
    samples, at a multiple of the bin width an exact shift (no resampling artifact), and in between they agree
    with sampling the image turned by the training code's bilinear rotation up to that resampling's blur."""
    from models.datasets import apply_pose

    enc = PolarEncoder(radii=8, angles=32)
    x = digits[0][:16]
    n, up = len(x), torch.zeros(16, dtype=torch.bool)
    base = enc.sample_polar(x)

    def posed(deg: float, mirrored: bool) -> torch.Tensor:
        return enc.sample_polar_posed(x, torch.full((n,), deg), up | mirrored)

    assert torch.allclose(posed(0.0, False), base, atol=1e-5)
    for k in (1, 3, 8, 20):
        assert torch.allclose(posed(k * 360 / 32, False), torch.roll(base, k, -1), atol=1e-5)
    for deg, mirrored in ((30.0, False), (-70.0, True), (0.0, True)):
        ref = enc.sample_polar(apply_pose(x, torch.full((n,), deg), up | mirrored))
        rel = ((posed(deg, mirrored) - ref).norm() / ref.norm()).item()
        assert rel < (0.02 if deg == 0.0 else 0.15), (deg, mirrored, rel)


def test_lattice_turn_poses_the_content_as_before_but_not_the_pixel_grid(digits):
    """sample_polar_posed with lattice_deg β resamples the (mirrored) source turned by β and reads it at grid
    points turned by φ − β: the content is posed by φ just as without β (up to one resampling's blur), while the
    pixel lattice sits at φ − β. With β = 0 it equals the plain posed samples bar the pixel-grid round trip."""
    enc = PolarEncoder(radii=8, angles=32)
    x = digits[0][:16]
    n = len(x)
    gen = torch.Generator().manual_seed(0)
    for deg, mirrored in ((0.0, False), (30.0, False), (-70.0, True), (135.0, True)):
        phi, m = torch.full((n,), deg), torch.full((n,), mirrored)
        plain = enc.sample_polar_posed(x, phi, m)
        assert torch.allclose(enc.sample_polar_posed(x, phi, m, torch.zeros(n)), plain, atol=1e-5)
        beta = (torch.rand(n, generator=gen) * 2 - 1) * 180
        jittered = enc.sample_polar_posed(x, phi, m, beta)
        rel = ((jittered - plain).norm() / plain.norm()).item()
        assert rel < 0.15, (deg, mirrored, rel)
        # the content is posed by φ, not by φ − β or φ + β (what a wrong sign in the round trip would give)
        for off in (beta, -beta):
            wrong = enc.sample_polar_posed(x, phi + off, m)
            assert ((jittered - wrong).norm() / plain.norm()).item() > 2 * rel
