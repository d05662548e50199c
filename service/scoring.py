"""Score graph outputs against the learned level Θ(x) and the bundle's calibration.

Two nonconformity scores per image, each compared with held-out in-distribution scores of its group:
    rotation   pose-posterior bundles (a rotation_score output): s_rot = log max p(pose|x) - log p(identity|x),
               how much less plausible x is as it stands than in its most plausible pose
               otherwise s_rot = |φ| / max(Θ(x), min_level)        (how far past the learned half-width)
               cyclic bundles: Θ(x) = 180°/n is half C_n's period; s_rot = d(φ, nearest multiple of 2Θ) / min_level
    reflection s_ref = P(reflected) * (1 - reflection level)   (a flip where flips are rare)
Each gets a conformal p-value and a threshold; the two thresholds are set together so that the inputs either one
flags are α of the held-out in-distribution ones (union_thresholds), and the verdict's p-value is the union's.
This module is the single implementation: the server, `symguard score` and `symguard eval` all call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel

from service.manifest import Calibration, GroupCalibration, Manifest


@dataclass(frozen=True)
class GraphOutputs:
    """Raw outputs of one session.run, rows aligned with the input batch."""

    pose: np.ndarray  # [N, 2]
    reflection_logit: np.ndarray  # [N]
    embedding: np.ndarray  # [N, D]
    level: np.ndarray  # [N, 2]
    class_logits: np.ndarray | None = None  # [N, K]
    rotation_score: np.ndarray | None = None  # [N], pose-posterior bundles

    def __len__(self) -> int:
        return len(self.reflection_logit)

    def rows(self, start: int, stop: int) -> GraphOutputs:
        return self.take(slice(start, stop))

    def take(self, idx: slice | np.ndarray) -> GraphOutputs:
        return GraphOutputs(*(None if v is None else v[idx] for v in self._fields()))

    @staticmethod
    def concat(parts: list[GraphOutputs]) -> GraphOutputs:
        columns = zip(*(p._fields() for p in parts))
        return GraphOutputs(*(None if c[0] is None else np.concatenate(c) for c in columns))

    def _fields(self) -> tuple[np.ndarray | None, ...]:
        return (self.pose, self.reflection_logit, self.embedding, self.level, self.class_logits, self.rotation_score)


Verdict = Literal["in", "ood"]
Reason = Literal["rotation", "reflection", "both"]


class ImageScore(BaseModel):
    angle_deg: float
    reflected: bool
    reflected_probability: float
    rotation_level_deg: float
    reflection_level: float
    score: float  # max of the two scores over their calibrated thresholds: > 1 means OOD
    rotation_score: float
    reflection_score: float
    p_value: float
    verdict: Verdict
    reason: Reason | None
    group: str  # the calibration group: class name or cluster id
    class_name: str | None = None
    hard_rule_ood: bool  # the anchor's baseline, |φ| > Θ (or a flip where Θ says flips are rare)
    model: str
    version: int


# ---------------------------------------------------------------- calibration (used by models/ at export)


def union_thresholds(rot: np.ndarray, ref: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """Thresholds for the two scores that together flag α of in-distribution inputs -> (rotation threshold,
    reflection threshold, union factor).

    Each threshold is the (n-j)-th smallest of its scores, the same j for both, and j is the largest for which the
    calibration inputs flagged by either score, U(j), keep (U(j) + 1) / (n + 1) <= α: the conformal bound of a
    single score, applied to the union. Bonferroni (each at α/2) guarantees the same bound but spends it twice
    where the two scores flag the same inputs, down to α/2 where they flag the very same ones
    (tests/service/test_calibration.py). The union factor α(n+1)/(j+1) turns the two p-values into the union's.
    """
    n = len(rot)
    r, f = np.sort(rot), np.sort(ref)

    def fits(j: int) -> bool:  # U(j) only grows with j, so bisect for the last j that fits
        return int(((rot > r[n - 1 - j]) | (ref > f[n - 1 - j])).sum()) + 1 <= alpha * (n + 1)

    lo, hi = 0, n  # invariant: every j < lo fits, no j >= hi does
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if fits(mid) else (lo, mid)
    best = lo - 1
    if best < 0:  # too few scores to certify α even for the single most extreme one
        return math.inf, math.inf, 2.0
    factor = min(2.0, max(1.0, alpha * (n + 1) / (best + 1)))
    return float(r[n - 1 - best]), float(f[n - 1 - best]), factor


def p_values(sorted_cal: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Conformal p = (1 + #{cal >= s}) / (n + 1), vectorised over s."""
    n = len(sorted_cal)
    ge = n - np.searchsorted(sorted_cal, s, side="left")
    return (1.0 + ge) / (n + 1.0)


MAX_CYCLIC_ORDER = 8


def cyclic_period(level_deg: np.ndarray) -> np.ndarray:
    """A cyclic bundle's level (half the period, 180°/n) -> the period 360°/n, snapped to the nearest n = 1..8."""
    n = np.clip(np.round(180.0 / np.maximum(level_deg, 1e-6)), 1, MAX_CYCLIC_ORDER)
    return 360.0 / n


def rotation_excess(angle_deg: np.ndarray, level_deg: np.ndarray, family: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (how far the angle is from what the level allows, in degrees; the hard rule's limit for it).

    uniform / gaussian: |φ| against the half-width Θ. cyclic: the distance from φ to the nearest multiple of the
    period, against a quarter period (half-way to the midpoint between two allowed poses)."""
    if family == "cyclic":
        period = cyclic_period(level_deg)
        r = np.mod(angle_deg, period)
        return np.minimum(r, period - r), period / 4.0
    return np.abs(angle_deg), level_deg


def nonconformity(
    out: GraphOutputs, min_level_deg: float, family: str = "uniform"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> angle (deg), P(reflected), rotation score, reflection score."""
    angle = np.degrees(np.arctan2(out.pose[:, 1], out.pose[:, 0]))
    p_refl = 1.0 / (1.0 + np.exp(-np.clip(out.reflection_logit.astype(np.float64), -60, 60)))
    refl_level = np.clip(out.level[:, 1], 0.0, 1.0)
    s_ref = p_refl * (1.0 - refl_level)
    if out.rotation_score is not None:
        return angle, p_refl, out.rotation_score.astype(np.float64), s_ref
    excess, _ = rotation_excess(angle, out.level[:, 0], family)
    # cyclic: the allowed poses are points, so the scale is the pose error's, not a learned width
    scale = min_level_deg if family == "cyclic" else np.maximum(out.level[:, 0], min_level_deg)
    return angle, p_refl, excess / scale, s_ref


def assign_groups(out: GraphOutputs, cal: Calibration, classes: list[str] | None) -> np.ndarray:
    """Index into cal.groups for every row."""
    n = len(out)
    if cal.group_by == "class" and out.class_logits is not None:
        return np.argmax(out.class_logits, axis=1)
    if cal.group_by == "cluster" and cal.centroids:
        c = np.asarray(cal.centroids, dtype=np.float32)
        d = ((out.embedding[:, None, :] - c[None]) ** 2).sum(-1)
        return np.argmin(d, axis=1)
    return np.zeros(n, dtype=np.int64)


def calibrate_groups(
    names: list[str],
    group_idx: np.ndarray,
    s_rot: np.ndarray,
    s_ref: np.ndarray,
    alpha: float,
    max_keep: int = 2000,
    sources: np.ndarray | None = None,
) -> list[GroupCalibration]:
    """Conformal thresholds per score type, set together so that the two flag α of in-distribution inputs.

    A group with enough independent scores to certify α/2 on its own (ceil(2/α), 200 at α = 1%) gets its own
    threshold (Mondrian: the rate then holds within the group); a smaller group borrows every group's scores.
    Independent means distinct source images: `sources` names each score's source, and several poses drawn from
    one digit count once, because their scores move together and ~50 digits drawn 8 times certify no better than
    ~50 (class thresholds from ~400 such draws each let 1.42-2.52% through on four of six specs; models/RESULTS.md,
    "False alarms, v7's calibration against v8's"). Without `sources` every score is its own source, so duplicates
    must already be gone (export de-duplicates its draws).
    (Tried: small groups sharing one threshold on scores divided by each group's 90th percentile. Where most
    scores are exactly 0 that scale is unstable, and detection fell on both bundles tried; models/RESULTS.md.)
    """
    if sources is None:
        sources = np.arange(len(s_rot))
    half = alpha / 2.0
    groups = []
    for gi, name in enumerate(names):
        sel = group_idx == gi
        own = len(np.unique(sources[sel])) >= math.ceil(1.0 / half)
        rot, ref = (s_rot[sel], s_ref[sel]) if own else (s_rot, s_ref)
        t_rot, t_ref, factor = union_thresholds(rot, ref, alpha)
        keep = lambda a: np.sort(a)[np.linspace(0, len(a) - 1, min(len(a), max_keep)).round().astype(int)]  # noqa: E731
        groups.append(
            GroupCalibration(
                name=name,
                rotation_scores=[round(float(v), 5) for v in keep(rot)],
                reflection_scores=[round(float(v), 5) for v in keep(ref)],
                rotation_threshold=t_rot,
                reflection_threshold=t_ref,
                union_factor=factor,
            )
        )
    return groups


# ---------------------------------------------------------------- scoring (used by the server and eval)


@dataclass(frozen=True)
class ScoreArrays:
    """Vectorised scores for a batch; eval reads these, the server turns them into ImageScore rows."""

    angle_deg: np.ndarray
    p_reflected: np.ndarray
    rotation_level: np.ndarray
    reflection_level: np.ndarray
    rotation_score: np.ndarray
    reflection_score: np.ndarray
    rotation_ratio: np.ndarray  # s / threshold
    reflection_ratio: np.ndarray
    p_value: np.ndarray
    ood_rotation: np.ndarray
    ood_reflection: np.ndarray
    hard_rule_ood: np.ndarray
    group: np.ndarray

    @property
    def ood(self) -> np.ndarray:
        return self.ood_rotation | self.ood_reflection

    @property
    def score(self) -> np.ndarray:
        return np.maximum(self.rotation_ratio, self.reflection_ratio)


def score_arrays(out: GraphOutputs, manifest: Manifest) -> ScoreArrays:
    cal = manifest.calibration
    family = manifest.group.rotation
    angle, p_refl, s_rot, s_ref = nonconformity(out, cal.min_level_deg, family)
    if not manifest.group.reflections:
        s_ref = np.zeros_like(s_ref)
    gidx = assign_groups(out, cal, manifest.classes)
    n = len(out)
    p_rot, p_ref = np.ones(n), np.ones(n)
    t_rot, t_ref, union = np.empty(n), np.empty(n), np.empty(n)
    for gi, g in enumerate(cal.groups):
        sel = gidx == gi
        if not sel.any():
            continue
        p_rot[sel] = p_values(g.rotation_array, s_rot[sel])
        p_ref[sel] = p_values(g.reflection_array, s_ref[sel])
        t_rot[sel], t_ref[sel], union[sel] = g.rotation_threshold, g.reflection_threshold, g.union_factor
    ratio_rot = s_rot / np.maximum(t_rot, 1e-9)
    ratio_ref = s_ref / np.maximum(t_ref, 1e-9) if manifest.group.reflections else np.zeros(n)
    p = np.minimum(1.0, union * np.minimum(p_rot, p_ref)) if manifest.group.reflections else p_rot
    width = cyclic_period(out.level[:, 0]) / 2.0 if family == "cyclic" else out.level[:, 0]
    refl_level = np.clip(out.level[:, 1], 0.0, 1.0)
    excess, limit = rotation_excess(angle, out.level[:, 0], family)
    hard = (excess > limit) | ((p_refl > 0.5) & (refl_level < 0.5) & manifest.group.reflections)
    return ScoreArrays(
        angle_deg=angle,
        p_reflected=p_refl,
        rotation_level=width,
        reflection_level=refl_level,
        rotation_score=s_rot,
        reflection_score=s_ref,
        rotation_ratio=ratio_rot,
        reflection_ratio=ratio_ref,
        p_value=p,
        ood_rotation=ratio_rot > 1.0,
        ood_reflection=ratio_ref > 1.0,
        hard_rule_ood=hard,
        group=gidx,
    )


def score_rows(out: GraphOutputs, manifest: Manifest) -> list[ImageScore]:
    a = score_arrays(out, manifest)
    names = [g.name for g in manifest.calibration.groups]
    classes = manifest.classes if manifest.classes and out.class_logits is not None else None
    cls = np.argmax(out.class_logits, axis=1).tolist() if classes else [None] * len(out)
    # whole columns to Python first: indexing numpy arrays element by element costs more than the rows themselves
    columns = zip(
        a.angle_deg.tolist(), a.p_reflected.tolist(), a.rotation_level.tolist(), a.reflection_level.tolist(),
        a.score.tolist(), a.rotation_score.tolist(), a.reflection_score.tolist(), a.p_value.tolist(),
        a.ood_rotation.tolist(), a.ood_reflection.tolist(), a.group.tolist(), a.hard_rule_ood.tolist(), cls,
    )  # fmt: skip
    rows = []
    for angle, p_refl, level, refl_level, score, s_rot, s_ref, p, rot, ref, group, hard, c in columns:
        reason: Reason | None = "both" if rot and ref else "rotation" if rot else "reflection" if ref else None
        rows.append(
            ImageScore(
                angle_deg=round(angle, 3),
                reflected=p_refl > 0.5,
                reflected_probability=round(p_refl, 5),
                rotation_level_deg=round(level, 3),
                reflection_level=round(refl_level, 5),
                score=round(score, 5),
                rotation_score=round(s_rot, 5),
                reflection_score=round(s_ref, 5),
                p_value=round(p, 6),
                verdict="ood" if (rot or ref) else "in",
                reason=reason,
                group=names[group],
                class_name=None if c is None else classes[c],  # type: ignore[index]
                hard_rule_ood=bool(hard),
                model=manifest.name,
                version=manifest.version,
            )
        )
    return rows
