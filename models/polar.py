"""The polar pose posterior: an exactly equivariant network whose output is a distribution over poses.

The image is sampled on a polar grid (R radii x A angles about the centre pixel), bilinearly, so a
rotation of the image by 360°/A·j is a cyclic shift of the angle axis by j; a left-right mirror reverses it. The
layers are convolutions that wrap around the angle axis, on mirror-regular fields (each field a pair: the filter
and its angle-reversed copy), so the whole network commutes with shifts and reversals of the angle axis:
  * exactly, for quarter turns and mirrors of the image (the polar grid is symmetric under them and bilinear
    sampling commutes with them), checked on the exported graph;
  * up to interpolation, for every multiple of 360°/A (11.25° for A = 32): far closer to a continuous rotation
    than a D4 network, whose angles between quarter turns are learned, not built in.
The output is a log-posterior over 2·A poses (unmirrored / mirrored x A angles). Trained by cross-entropy toward
the identity on draws of the training distribution, it learns p(pose | x): how the data poses inputs like x.
That one distribution gives the pose (its circular mean), the reflection logit, and how surprising the identity
pose is for x (the rotation nonconformity score). The sampling is a Gather and a weighted sum with constant
taps, not a GridSample.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.datasets import apply_pose
from models.networks import Block, FieldNorm, _BankConv

MIRROR = 2  # a mirror-regular field has two channels: (unmirrored, mirrored)


def polar_taps(size: int, radii: int, angles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The polar matrix's nonzeros, 4 per row: (pixel index [R*A, 4], weight [R*A, 4]); padding taps weigh 0. The
    graph samples by Gather and a weighted sum of these: 4 multiply-adds per sample instead of size² and a 3 MB
    dense constant."""
    p = polar_matrix(size, radii, angles)
    w, idx = p.topk(4, dim=1)
    return idx, w


def polar_matrix(size: int, radii: int, angles: int) -> torch.Tensor:
    """[radii*angles, size*size] bilinear sampling of a size x size image at radius r_i, angle 2π·a/A (x right,
    y up) about the centre pixel; radii evenly spaced from 0.75 px to half the image less one pixel."""
    c = (size - 1) / 2
    p = np.zeros((radii * angles, size * size), np.float32)
    for i, r in enumerate(polar_radii(size, radii)):
        for a in range(angles):
            t = 2 * math.pi * a / angles
            col, row = c + r * math.cos(t), c - r * math.sin(t)
            c0, r0 = math.floor(col), math.floor(row)
            for dr, wr in ((0, 1 - (row - r0)), (1, row - r0)):
                for dc, wc in ((0, 1 - (col - c0)), (1, col - c0)):
                    if wr * wc > 1e-12 and 0 <= r0 + dr < size and 0 <= c0 + dc < size:
                        p[i * angles + a, (r0 + dr) * size + c0 + dc] += wr * wc
    return torch.from_numpy(p)


def polar_radii(size: int, radii: int) -> np.ndarray:
    """The grid's radii in pixels: evenly spaced from 0.75 px to half the image less one pixel."""
    return np.linspace(0.75, (size - 1) / 2 - 1.0, radii)


def polar_grid_sample(x: torch.Tensor, radii: torch.Tensor, angles: int, angle_deg: torch.Tensor,
                      mirrored: torch.Tensor) -> torch.Tensor:
    """[N, C, R, A] bilinear samples of x' = R_φ M^m x at polar_matrix's points: x'(p) = x(M^m R_{-φ} p), so the
    sample at (r, t) is x at radius r, angle t - φ, mirrored left-right (x -> -x) if m."""
    n, _, size, _ = x.shape
    c = (size - 1) / 2
    t = torch.arange(angles) * (2 * math.pi / angles)
    src = t[None, :] - torch.deg2rad(angle_deg)[:, None]  # [N, A]
    sign = torch.where(mirrored, -1.0, 1.0)[:, None, None]
    col = c + sign * radii[None, :, None] * torch.cos(src)[:, None, :]  # [N, R, A]
    row = c - radii[None, :, None] * torch.sin(src)[:, None, :]
    grid = torch.stack([(2 * col + 1) / size - 1, (2 * row + 1) / size - 1], dim=-1)  # align_corners=False units
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def reverse_angles(x: torch.Tensor) -> torch.Tensor:
    """a -> -a (mod A) on the last axis: what a vertical flip of the image does to the polar grid."""
    return torch.roll(x.flip(-1), 1, -1)


def _mirror_index(shape: tuple[int, ...], lifting: bool) -> torch.Tensor:
    """Gather index turning raw weights into the bank of both field halves: bank[co, h] = h·W[co] for the lifting
    layer; bank[co, h, ci, h'] = h·W[co, ci, h xor h'] for the group layer; h = mirrored reverses the kernel's
    angle axis."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    if lifting:
        bank = np.stack([idx, idx[..., ::-1]], axis=1)  # [Co, 2, Ci, kr, ka]
        return torch.from_numpy(bank.reshape(shape[0] * MIRROR, *shape[1:]).copy())
    bank = np.stack([idx, idx[:, :, ::-1, :, ::-1]], axis=1)  # [Co, 2(h), Ci, 2(h'), kr, ka]
    co, ci, _, kr, ka = shape
    return torch.from_numpy(bank.reshape(co * MIRROR, ci * MIRROR, kr, ka).copy())


class MirrorConv(_BankConv):
    """Convolution over (radius, angle), wrapping around the angle axis, zero-padded along the radius.
    lifting: [N, Ci, R, A] -> [N, Co*2, R', A]; else mirror-regular fields [N, Ci*2, R, A] -> [N, Co*2, R', A].
    The bank is gathered as for the D4 layers (`_BankConv`); only the padding differs."""

    group = MIRROR

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int], stride: int = 1, dilation: int = 1,
                 lifting: bool = False):  # fmt: skip
        super().__init__()
        shape = (c_out, c_in, *kernel) if lifting else (c_out, c_in, MIRROR, *kernel)
        fan_in = int(np.prod(shape[1:]))
        self.weight = nn.Parameter(torch.randn(shape) * math.sqrt(2.0 / fan_in))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("index", _mirror_index(shape, lifting), persistent=False)
        self.stride, self.dilation = stride, dilation
        self.pad_r, self.pad_a = kernel[0] // 2, dilation * (kernel[1] // 2)

    def conv_with(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.pad_a:  # wrap around the angle axis (slices + Concat in ONNX, no Pad mode needed)
            x = torch.cat([x[..., -self.pad_a :], x, x[..., : self.pad_a]], dim=-1)
        return F.conv2d(x, w, b, (self.stride, 1), (self.pad_r, 0), (1, self.dilation))


class PolarEncoder(nn.Module):
    """x -> (embedding [N,D] invariant, pose [N,2] = (cos φ, sin φ) scaled by its concentration, reflection logit
    [N], log-posterior over poses [N, 2, A]: index (0, a) = "x is its canonical form turned by 360°·a/A", (1, a) =
    "... turned after a mirror").

    Pose convention (service/geometry.py): x = R_φ M^m c. Mass at (1, a) means x = R_a F c with F the vertical
    flip (the reversal of the angle axis), and F = R_180 M, so φ = a + 180°.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32, 48), hidden: int = 32, embed_dim: int = 32,
                 in_channels: int = 1, size: int = 29, radii: int = 16, angles: int = 32):  # fmt: skip
        super().__init__()

        def block(ci: int, co: int, kernel=(3, 5), stride=1, dilation=1, lifting=False) -> Block:
            conv = MirrorConv(ci, co, kernel, stride, dilation, lifting)
            return Block(conv, FieldNorm(co, MIRROR), nn.ReLU())

        c1, c2, c3, c4 = channels
        self.size, self.radii, self.angles, self.fields, self.in_channels = size, radii, angles, c4, in_channels
        taps, weights = polar_taps(size, radii, angles)
        self.register_buffer("taps", taps, persistent=False)
        self.register_buffer("tap_weights", weights, persistent=False)
        # radius 16 -> 8 -> 4 -> 2; the dilations widen the angular reach to ±(2 + 2 + 4 + 8) bins
        self.features = nn.Sequential(
            block(in_channels, c1, lifting=True),
            block(c1, c2, stride=2),
            block(c2, c3, stride=2, dilation=2),
            block(c3, c4, stride=2, dilation=4),
        )
        # on the angle ring left after pooling the radii: a wider mix, then one kernel spanning the whole ring, so
        # every pose's logit reads the whole digit
        self.head = nn.Sequential(block(c4, hidden, (1, 9), dilation=2), MirrorConv(hidden, 1, (1, angles - 1)))
        self.embed = nn.Sequential(nn.Linear(2 * c4, 128), nn.ReLU(), nn.Linear(128, embed_dim))
        # cyclic data (C_n) gives the posterior n equal modes, whose circular mean is no pose: such bundles read ψ
        # at the highest mode (models/train.py sets this from the spec's family; it is not a parameter)
        self.pose_at_mode = False
        t = torch.arange(angles) * (2 * math.pi / angles)
        self.register_buffer("ring", torch.stack([torch.cos(t), torch.sin(t)], 1), persistent=False)  # [A, 2]

    def sample_polar(self, x: torch.Tensor) -> torch.Tensor:
        v = x.reshape(-1, self.in_channels, self.size * self.size)[:, :, self.taps]  # [N, C, R*A, 4]
        return (v * self.tap_weights).sum(-1).reshape(-1, self.in_channels, self.radii, self.angles)

    def sample_polar_posed(self, x: torch.Tensor, angle_deg: torch.Tensor, mirrored: torch.Tensor,
                           lattice_deg: torch.Tensor | None = None) -> torch.Tensor:
        """The polar samples of R_φ M^m x (training only), read off x's pixels at the turned grid points instead of
        off an image resampled by φ, so no draw carries resampling artifacts that a turn by φ alone would leave
        (the network learned to read those from resampled draws: models/RESULTS.md).

        lattice_deg (β): first mirror x and resample it turned by β on the pixel grid, then read it at grid
        points turned by φ − β. The content is posed by φ as before, but the pixel lattice now sits at φ − β,
        not at φ: without β the lattice always turns with the content, so a network can read the pose off the
        lattice (interpolation leaves a quarter-turn-periodic pattern fixed to the pixel axes), which served
        images, always on an upright lattice, then contradict. Every draw is resampled once, so blur is no cue."""
        radii = torch.from_numpy(polar_radii(self.size, self.radii)).float()
        if lattice_deg is None:
            return polar_grid_sample(x, radii, self.angles, angle_deg, mirrored)
        x = apply_pose(x, lattice_deg, mirrored)  # R_β M^m x on the pixel grid
        return polar_grid_sample(x, radii, self.angles, angle_deg - lattice_deg, torch.zeros_like(mirrored))

    def forward(self, x: torch.Tensor):
        return self.forward_polar(self.sample_polar(x))

    def forward_polar(self, p: torch.Tensor):
        """The network on polar samples [N, C, R, A] (sample_polar's output)."""
        f = self.features(p).mean(2, keepdim=True)  # pool the radii: [N, C*2, 1, A]
        # invariant: pool each field over the ring and both halves (a shift or reversal only permutes those)
        g = f.reshape(-1, self.fields, MIRROR * self.angles)
        # unit length: the InfoNCE term compares directions, and the pseudo-labels' k-NN then ranks by the same
        emb = self.embed(torch.cat([g.mean(-1), g.amax(-1)], dim=1))
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)  # = F.normalize, without its Shape/Expand ops
        logp = F.log_softmax(self.head(f).reshape(-1, MIRROR * self.angles), dim=1).reshape(-1, MIRROR, self.angles)
        q = logp.exp()
        logit = torch.logsumexp(logp[:, 1], dim=1) - torch.logsumexp(logp[:, 0], dim=1)
        mirrored = (logit > 0)[:, None]
        if self.pose_at_mode:
            half = torch.where(mirrored, q[:, 1], q[:, 0])
            v = mode_vector(half, self.ring)
            return emb, torch.where(mirrored, -v, v), logit, logp
        # circular means of each hypothesis; the mirrored one is turned by 180° (F = R_180 M)
        v0, v1 = q[:, 0] @ self.ring, -(q[:, 1] @ self.ring)
        mass0, mass1 = q[:, 0].sum(1, keepdim=True), q[:, 1].sum(1, keepdim=True)
        pose = torch.where(mirrored, v1 / (mass1 + 1e-12), v0 / (mass0 + 1e-12))
        return emb, pose, logit, logp


def mode_vector(q: torch.Tensor, ring: torch.Tensor, reach: int = 2) -> torch.Tensor:
    """The highest mode of q [N, A] as a plane vector: the mean of ring [A, 2] over the ±reach bins around the
    argmax, weighted by q (sub-bin precision without averaging in the other modes)."""
    idx = torch.remainder(q.argmax(1, keepdim=True) + torch.arange(-reach, reach + 1), q.shape[1])  # [N, 2r+1]
    return (q.gather(1, idx)[..., None] * ring[idx]).sum(1)


def identity_surprise(logp: torch.Tensor) -> torch.Tensor:
    """log max p(pose | x) - log p(identity | x) >= 0: how much less plausible x is as it stands than in its most
    plausible pose. 0 when the identity is a most likely pose; the rotation nonconformity score."""
    return logp.flatten(1).amax(1) - logp[:, 0, 0]


def pose_target(delta: torch.Tensor, angles: int) -> torch.Tensor:
    """Soft one-hot [N, 2*A] at angle δ (radians), unmirrored, split between the two nearest bins."""
    pos = torch.remainder(delta, 2 * math.pi) / (2 * math.pi / angles)
    lo = torch.floor(pos)
    frac = pos - lo
    lo = lo.long() % angles
    t = torch.zeros(len(delta), MIRROR * angles)
    rows = torch.arange(len(delta))
    t[rows, lo] += 1 - frac
    t[rows, (lo + 1) % angles] += frac
    return t
