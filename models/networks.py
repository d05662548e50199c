"""Networks, in plain torch: D4 (p4m) group convolutions, the invariant–equivariant encoder, the decoder.

Group convolutions expand one learned filter bank into its 8 rotated/mirrored copies with a single gather, so
the graph exported to ONNX is an ordinary Conv stack and is *exactly* equivariant to 90° rotations and mirrors.
Stride-2 stages keep exactness only on odd sizes (29 -> 15 -> 8), which is why the input is 29x29.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from service.geometry import D4, apply_d4

# ---------------------------------------------------------------- the group D4

N_G = len(D4)  # 8 elements, index i <-> D4[i] = (quarter turns k, mirrored f)
_IDX = {g: i for i, g in enumerate(D4)}


def _mul(g: tuple[int, bool], h: tuple[int, bool]) -> tuple[int, bool]:
    (k1, f1), (k2, f2) = g, h
    return ((k1 + (-k2 if f1 else k2)) % 4, f1 ^ f2)


def _inv(g: tuple[int, bool]) -> tuple[int, bool]:
    k, f = g
    return (k, f) if f else ((-k) % 4, f)


def plane_matrix(g: tuple[int, bool]) -> np.ndarray:
    """ρ(g) on plane vectors (x right, y up): a quarter turn CCW, after a left-right mirror."""
    k, f = g
    c, s = [1, 0, -1, 0][k], [0, 1, 0, -1][k]
    r = np.array([[c, -s], [s, c]], dtype=np.float64)
    return r @ (np.diag([-1.0, 1.0]) if f else np.eye(2))


def lifting_index(shape: tuple[int, ...]) -> torch.Tensor:
    """Gather index turning W[Co,Ci,s,s] into the expanded bank [Co*8, Ci, s, s] with bank[co*8+h] = h·W[co]."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    banks = np.stack([apply_d4(idx, k, f) for k, f in D4], axis=1)  # [Co, 8, Ci, s, s]
    return torch.from_numpy(banks.reshape(shape[0] * N_G, *shape[1:]).copy())


def group_index(shape: tuple[int, ...]) -> torch.Tensor:
    """Gather index turning W[Co,Ci,8,s,s] into [Co*8, Ci*8, s, s] with bank[co,h,ci,h'] = h·W[co,ci,h^-1 h']."""
    idx = np.arange(int(np.prod(shape))).reshape(shape)
    banks = []
    for h in D4:
        hinv = _inv(h)
        perm = [_IDX[_mul(hinv, hp)] for hp in D4]
        banks.append(apply_d4(idx[:, :, perm], *h))  # [Co, Ci, 8, s, s]
    b = np.stack(banks, axis=1)  # [Co, 8(h), Ci, 8(h'), s, s]
    co, ci, _, s, _ = shape
    return torch.from_numpy(b.reshape(co * N_G, ci * N_G, s, s).copy())


# ---------------------------------------------------------------- layers


class _BankConv(nn.Module):
    """A convolution whose filter bank is gathered from raw parameters: `bank()` builds it, `conv_with` applies a
    bank (this one, or one a caller has rescaled, as Block does in eval mode)."""

    group = N_G  # channels per field
    weight: nn.Parameter
    bias: nn.Parameter
    index: torch.Tensor
    stride: int
    pad: int
    dilation: int = 1

    def bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.flatten()[self.index], self.bias.repeat_interleave(self.group)

    def conv_with(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.pad, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_with(x, *self.bank())


class LiftingConv(_BankConv):
    """Image [N, Ci, H, W] -> regular D4 fields [N, Co*8, H', W']."""

    def __init__(self, c_in: int, c_out: int, size: int, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, size, size) * math.sqrt(2.0 / (c_in * size * size)))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("index", lifting_index(tuple(self.weight.shape)), persistent=False)
        self.stride, self.pad = stride, size // 2


class GroupConv(_BankConv):
    """Regular D4 fields [N, Ci*8, H, W] -> [N, Co*8, H', W']."""

    def __init__(self, c_in: int, c_out: int, size: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        fan_in = c_in * N_G * size * size
        self.weight = nn.Parameter(torch.randn(c_out, c_in, N_G, size, size) * math.sqrt(2.0 / fan_in))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("index", group_index(tuple(self.weight.shape)), persistent=False)
        self.stride, self.dilation, self.pad = stride, dilation, dilation * (size // 2)


class FieldNorm(nn.Module):
    """BatchNorm with one statistic per field (shared over its group channels), so it stays equivariant."""

    def __init__(self, c: int, group: int = N_G):
        super().__init__()
        self.bn = nn.BatchNorm3d(c)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self.bn(x.view(n, -1, self.group, h, w)).view(n, -1, h, w)


class Block(nn.Sequential):
    """group conv -> FieldNorm -> ReLU. In eval mode the norm is folded into the conv's filter bank and bias: the
    exported graph is then Conv -> Relu, with no 5-D reshapes around a BatchNormalization per stage (ONNX Runtime
    folds the bank arithmetic into constants at load). One scale per field keeps the fold exactly equivariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm, act = self
        if self.training:
            return act(norm(conv(x)))
        bn = norm.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        w, b = conv.bank()
        s8 = scale.repeat_interleave(conv.group)
        return act(conv.conv_with(x, w * s8[:, None, None, None], b * s8 + shift.repeat_interleave(conv.group)))


def block(c_in: int, c_out: int, size: int, stride: int, lifting: bool = False, dilation: int = 1) -> Block:
    conv = LiftingConv(c_in, c_out, size, stride) if lifting else GroupConv(c_in, c_out, size, stride, dilation)
    return Block(conv, FieldNorm(c_out), nn.ReLU())


# ---------------------------------------------------------------- encoder: invariant embedding + equivariant pose


class Encoder(nn.Module):
    """x -> (embedding [N,D] invariant, pose [N,2] = (cos φ, sin φ), reflection logit [N], fine hypotheses z, w,
    D4 logits, coarse hypotheses).

    The last group fields are pooled over space and mixed into two regular fields, each with
    F_h(g·x) = F_{g^-1 h}(x). For any such field v = Σ_h F_h ρ(h) e transforms as ρ(g) v; its rotation half z
    (h in C4) is the pose of an unmirrored input and its mirrored half w gives the pose of a mirrored one
    (ψ = (φ, 1) has ρ(ψ) e = R_φ M e = -R_φ e, so R_φ e = -w).
    * coarse field: 8 logits, softmax = a distribution over D4. The identity prior (cross-entropy toward the
      identity, as in prior-regularised canonicalisation) and the mirror decision live here. The reflection logit
      log P(mirrored) - log P(not) is rotation invariant and flips sign under M.
    * fine field: unnormalised, so its angle is continuous; trained to agree with the coarse one and to rotate
      with the input between the exact 90° steps. It is the reported pose.
    Peaked coarse distributions would quantise a soft-argmax angle to multiples of 90°, hence two fields.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 24), embed_dim: int = 32, in_channels: int = 1,
                 pose_hidden: int = 0):
        super().__init__()
        c1, c2, c3 = channels
        self.fields = c3
        # "which way is up" is a property of the whole digit: the dilated last stage lets each feature see ~27 of
        # the 29 pixels (receptive fields 5, 7, 11, 27); dilation on the symmetric 8x8 grid stays exact.
        self.features = nn.Sequential(
            block(in_channels, c1, 5, 1, lifting=True),  # 29 -> 29
            block(c1, c2, 3, 2),  # 29 -> 15
            block(c2, c3, 3, 2),  # 15 -> 8
            block(c3, c3, 3, 1, dilation=2),  # 8 -> 8
        )
        if pose_hidden:
            # an equivariant MLP on the pooled fields (1x1 group convs mix the 8 group channels as D4 allows):
            # on upright digits, prior-only training, it found "up" for 80.5% of test digits against 74.7% for
            # the linear read-out at 600 steps (`python -m models.prior_probe`, models/RESULTS.md)
            self.pose_head: nn.Module | None = nn.Sequential(
                GroupConv(c3, pose_hidden, 1), nn.ReLU(), GroupConv(pose_hidden, 2, 1)
            )
        else:
            self.pose_head = None
            self.pose_field = nn.Linear(c3, 2)  # shared over h: a 1x1 group conv giving two regular fields
        self.embed = nn.Sequential(nn.Linear(4 * c3, 128), nn.ReLU(), nn.Linear(128, embed_dim))
        basis = np.stack([plane_matrix(g) @ np.array([1.0, 0.0]) for g in D4])  # [8, 2]
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        c = self.fields  # a Python int, not f.shape[1]: the reshapes below then export with constant shapes
        # [N, C, 8]: spatial pooling keeps the group axis
        fmax, f = f.amax((2, 3)).reshape(-1, c, N_G), f.mean((2, 3)).reshape(-1, c, N_G)
        # pooling over the orbit (mean and max over the 8 group channels) makes it invariant
        inv = torch.cat([f.mean(-1), f.amax(-1), fmax.mean(-1), fmax.amax(-1)], dim=1)
        emb = self.embed(inv)
        if self.pose_head is not None:
            fields = self.pose_head(f.reshape(-1, c * N_G, 1, 1)).reshape(-1, 2, N_G).transpose(1, 2)  # [N, 8, 2]
        else:
            fields = self.pose_field(f.transpose(1, 2))  # [N, 8, 2]
        logits, cont = fields[..., 0], fields[..., 1]
        # coarse: a distribution over D4 (the identity prior and the mirror decision live here)
        p = torch.softmax(logits, dim=1)
        z_coarse, w_coarse = p[:, :4] @ self.basis[:4], p[:, 4:] @ self.basis[4:]
        logit = torch.logsumexp(logits[:, 4:], dim=1) - torch.logsumexp(logits[:, :4], dim=1)
        # fine: an unnormalised equivariant vector per hypothesis, free to point at any angle
        z, wv = cont[:, :4] @ self.basis[:4], cont[:, 4:] @ self.basis[4:]
        pose = torch.where((logit > 0)[:, None], -wv, z)
        return emb, pose, logit, z, -wv, logits, z_coarse, -w_coarse


class LevelHead(nn.Module):
    """Invariant by construction: reads only the invariant embedding. -> [N, 2] = (width in degrees, reflection rate)."""

    def __init__(self, embed_dim: int = 32, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        y = self.net(emb)
        return torch.stack([180.0 * torch.sigmoid(y[:, 0]), torch.sigmoid(y[:, 1])], dim=1)


class Bundle(nn.Module):
    """What is exported: encoder + level head (+ optional class head). Outputs follow manifest.OutputNames:
    pose, reflection_logit, embedding, level, then class_logits if there is a class head, then rotation_score if
    the encoder is a pose posterior (models/polar.py)."""

    def __init__(self, encoder: nn.Module, level: LevelHead, class_head: nn.Module | None = None):
        super().__init__()
        self.encoder, self.level, self.class_head = encoder, level, class_head

    @property
    def has_rotation_score(self) -> bool:
        from models.polar import PolarEncoder

        return isinstance(self.encoder, PolarEncoder)

    def forward(self, x: torch.Tensor):
        from models.polar import identity_surprise

        emb, pose, logit, *rest = self.encoder(x)
        outs = (pose, logit, emb, self.level(emb))
        if self.class_head is not None:
            outs += (self.class_head(emb),)
        if self.has_rotation_score:
            outs += (identity_surprise(rest[0]),)
        return outs


# ---------------------------------------------------------------- differentiable image rotation (training only)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate images [N,C,H,W] counter-clockwise (as displayed) about the centre by the angle (cos, sin)."""
    # affine_grid maps output coords to input coords, with y pointing down the rows: sample at R_{-φ} p.
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], -1), torch.stack([sin, cos, torch.zeros_like(cos)], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)
