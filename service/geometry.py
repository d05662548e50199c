"""The pose group O(2) and its exact subgroup D4, on numpy arrays and Pillow images.

Convention (used everywhere, training included): a pose ψ = (φ, m) acts on an image c as
    x = R_φ M^m c        (mirror first, then rotate)
where R_φ rotates counter-clockwise as a viewer sees the image and M mirrors left-right.
So the canonical form of x is c = M^m R_{-φ} x: undo the rotation first, then the mirror.
Composition: (φ1, m1)(φ2, m2) = (φ1 + (-1)^m1 φ2, m1 xor m2).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# The eight elements of D4 as (quarter turns k, mirrored).
D4 = [(k, f) for f in (False, True) for k in range(4)]


def wrap_deg(angle: np.ndarray | float) -> np.ndarray | float:
    """Wrap to (-180, 180]."""
    a = np.mod(np.asarray(angle, dtype=np.float64) + 180.0, 360.0) - 180.0
    a = np.where(a == -180.0, 180.0, a)
    return a if a.ndim else float(a)


def compose(g: tuple[float, bool], h: tuple[float, bool]) -> tuple[float, bool]:
    """Group product g·h of two O(2) elements given as (angle in degrees, mirrored)."""
    (a1, m1), (a2, m2) = g, h
    return float(wrap_deg(a1 + (-a2 if m1 else a2))), bool(m1) ^ bool(m2)


def apply_d4(x: np.ndarray, k: int, mirrored: bool) -> np.ndarray:
    """g·x for g = R_{90k} M^mirrored on arrays shaped [..., H, W]; exact (no interpolation)."""
    if mirrored:
        x = x[..., :, ::-1]
    return np.ascontiguousarray(np.rot90(x, k, axes=(-2, -1)))


def canonicalize(img: Image.Image, angle_deg: float, reflected: bool, fill: int | tuple = 0) -> Image.Image:
    """c = M^m R_{-φ} x: rotate back by φ about the centre, then undo the mirror. Same size as the input."""
    out = img.rotate(-angle_deg, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)
    return ImageOps.mirror(out) if reflected else out
