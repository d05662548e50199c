"""The bundle manifest: the one contract between models/ (which writes it) and service/ (which reads it).

A bundle is ``REPO/NAME/VERSION/{manifest.json, model.onnx}``. This module has no torch dependency so the
server can import it; the training side imports it too, so there is exactly one definition.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

RotationFamily = Literal["uniform", "gaussian", "cyclic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- dataset specs (data, not code)


class SymmetrySpec(_Strict):
    """How one class (or a whole unlabelled folder) is rotated and reflected.

    uniform: angle ~ U(-width, width); gaussian: angle ~ N(0, width^2);
    cyclic: angle ~ uniform over the multiples of 360/order. reflection_rate: P(horizontal flip).
    """

    rotation: RotationFamily = "uniform"
    width_deg: float = Field(0.0, ge=0.0, le=180.0)
    order: int = Field(1, ge=1, le=64)
    reflection_rate: float = Field(0.0, ge=0.0, le=1.0)


class DatasetSpec(_Strict):
    """A training distribution described as data: a source of upright images plus per-class symmetry."""

    name: str
    source: Literal["mnist", "folder"] = "mnist"
    path: str | None = None  # folder datasets: the image folder (class sub-folders optional)
    default: SymmetrySpec = SymmetrySpec()
    classes: dict[str, SymmetrySpec] = {}  # class name -> symmetry; missing classes use `default`
    augment: bool = True  # False: use images as they are (a user's own folder already holds its symmetries)
    copies: int = Field(4, ge=1, le=100)  # augmented draws per source image
    seed: int = 0

    def symmetry_of(self, class_name: str | None) -> SymmetrySpec:
        if class_name is None:
            return self.default
        return self.classes.get(class_name, self.default)


# ---------------------------------------------------------------- bundle manifest


class InputSpec(_Strict):
    name: str = "image"
    size: int = Field(..., description="square side in pixels; odd so stride-2 stages stay exactly equivariant")
    channels: Literal[1, 3] = 1
    mean: float = 0.0  # normalised = (pixel/255 - mean) / std
    std: float = 1.0
    background: float = Field(0.0, ge=0.0, le=1.0, description="pad value in [0, 1] pixel units")
    resize: Literal["fit_pad"] = "fit_pad"  # shrink to fit (keep aspect) if larger, then centre-pad

    @field_validator("size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v < 5 or v % 2 == 0:
            raise ValueError("input size must be odd and >= 5 for exact equivariance under stride 2")
        return v


class GroupSpec(_Strict):
    """Pose group: ψ(x) lives in SO(2) or O(2). `exact` lists the transforms the graph is exactly equivariant to."""

    rotation: RotationFamily = "uniform"  # family of the learned level Θ(x)
    reflections: bool = True
    exact: list[str] = ["rot90", "flip"]


class OutputNames(_Strict):
    """Graph output names. Shapes: pose [N,2] (cos φ, sin φ); reflection_logit [N] (>0: reflected);
    embedding [N,D] invariant; level [N,2] (width in degrees, reflection rate); class_logits [N,K] optional;
    rotation_score [N] optional: the graph's own rotation nonconformity (a pose-posterior bundle's log max p(pose|x)
    - log p(identity|x)), used in place of |φ| / Θ(x) when present."""

    pose: str = "pose"
    reflection_logit: str = "reflection_logit"
    embedding: str = "embedding"
    level: str = "level"
    class_logits: str | None = None
    rotation_score: str | None = None


class GroupCalibration(_Strict):
    """Held-out in-distribution nonconformity scores of one group (class or cluster), sorted ascending.

    rotation score = |φ| / max(Θ(x), min_level_deg), or the graph's rotation_score output;
    reflection score = P(reflected) * (1 - reflection level).
    A conformal p-value is (1 + #{cal >= s}) / (n + 1).
    """

    name: str
    rotation_scores: list[float]
    reflection_scores: list[float]
    rotation_threshold: float
    reflection_threshold: float
    # p = min(1, union_factor * min(p_rot, p_ref)), so that p <= α exactly when a score passes its threshold.
    # 2 is Bonferroni (each score at α/2; the default of bundles calibrated before the union was); since
    # mnist-multiple-flip/8 the thresholds are set jointly so the union of the two flags is at α, and it is 1-2.
    union_factor: float = Field(2.0, ge=1.0, le=2.0)

    # The score lists as arrays, built once: every scored batch searches them, and converting ~2,000 floats per
    # group per batch cost 0.1 ms of a 32-image batch's 0.4 ms of scoring (runs/scratch/score_rows_bench.py).
    # The model is frozen, so they never go stale.
    @cached_property
    def rotation_array(self) -> np.ndarray:
        return np.asarray(self.rotation_scores, dtype=np.float64)

    @cached_property
    def reflection_array(self) -> np.ndarray:
        return np.asarray(self.reflection_scores, dtype=np.float64)


class Calibration(_Strict):
    alpha: float = Field(0.01, gt=0.0, lt=0.5)
    group_by: Literal["class", "cluster", "global"] = "cluster"
    min_level_deg: float = 5.0
    groups: list[GroupCalibration]
    centroids: list[list[float]] | None = None  # cluster centres in embedding space (group_by == "cluster")


class Probe(_Strict):
    """An in-distribution probe the server runs at startup; the pixels are preprocessed model input."""

    png_base64: str  # size x size, 8-bit, already preprocessed (before normalisation)
    angle_deg: float  # expected outputs, for a parity check
    reflection_logit: float


class FileEntry(_Strict):
    path: str
    sha256: str


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: int = Field(..., ge=1)
    created: str
    description: str = ""
    input: InputSpec
    group: GroupSpec
    outputs: OutputNames = OutputNames()
    graph: str = "model.onnx"
    classes: list[str] | None = None
    calibration: Calibration
    dataset: DatasetSpec
    metrics: dict[str, float] = {}
    equivariance_error: dict[str, float] = {}  # symmetry type -> relative error, e.g. rot90, flip, rot45
    probes: list[Probe] = []
    files: list[FileEntry] = []

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not is_safe_name(v):
            raise ValueError("model name must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
        return v

    # ---- io

    @classmethod
    def load(cls, bundle_dir: Path) -> Manifest:
        return cls.model_validate_json((Path(bundle_dir) / MANIFEST_FILE).read_bytes())

    def write(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")
        return path


def is_safe_name(name: str) -> bool:
    """Model names become folder names: no separators, no dot-dot, bounded length."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name)) and ".." not in name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
