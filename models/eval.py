"""`symguard eval`: measure a bundle through ONNX Runtime and the server's own scoring code.

Protocols (test digits only, never trained on or calibrated on):
  in-distribution   test digits posed as the training spec says -> false-alarm rate, level error
  rotation OOD      the anchor's protocol: test digits rotated U(-180°, 180°), truth = |rotation| > θ of its class
  reflection OOD    in-distribution rotation, mirrored with probability 0.5; truth = mirrored where the class never is
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from sklearn.metrics import roc_auc_score

from models.datasets import Source, apply_pose, draw_poses, load_source, repeat, true_levels
from service.manifest import DatasetSpec, InputSpec, Manifest
from service.scoring import rotation_excess, score_arrays

IN_DIST_DRAWS = 4


class ClassRow(BaseModel):
    group: str
    n: int
    true_width_deg: float
    mean_pred_width_deg: float
    level_mae_deg: float
    true_reflection_rate: float
    mean_pred_reflection_rate: float
    false_alarm_rate: float
    ood_accuracy: float
    ood_accuracy_hard_rule: float


class EvalReport(BaseModel):
    bundle: str
    dataset: str
    alpha: float
    ood_accuracy: float  # calibrated verdict, anchor protocol
    ood_accuracy_hard_rule: float  # |ψ| > Θ(x), the anchor's rule
    false_alarm_rate_hard_rule: float  # the rule has no α: how often |ψ| > Θ(x) on in-distribution draws
    # the calibrated score's accuracy with its threshold moved to the rule's false-alarm rate: score vs rule, like
    # for like (the calibrated verdict trades accuracy for its α)
    ood_accuracy_score_at_rule_far: float
    ood_auroc: float
    # diagnostics: which half limits the rule. The same rule with the class's true level in place of Θ(x), and
    # with the true rotation in place of ψ(x); and the AUROC of the rotation score alone (no reflection half)
    ood_accuracy_rule_true_level: float
    ood_accuracy_rule_true_pose: float
    ood_auroc_rotation_score: float
    level_mae_deg: float  # per sample
    level_class_mean_mae_deg: float
    false_alarm_rate: float
    reflection_auroc: float | None
    reflection_accuracy: float | None
    per_class: list[ClassRow]

    def headline(self) -> dict[str, float]:
        keys = ["ood_accuracy", "ood_accuracy_hard_rule", "ood_auroc", "level_mae_deg", "level_class_mean_mae_deg",
                "false_alarm_rate", "reflection_auroc", "reflection_accuracy"]  # fmt: skip
        return {k: round(float(getattr(self, k)), 5) for k in keys if getattr(self, k) is not None}

    def table(self) -> str:
        lines = [
            f"bundle {self.bundle}  dataset {self.dataset}  alpha {self.alpha}",
            f"  OOD accuracy (calibrated)   {100 * self.ood_accuracy:6.2f}%",
            f"  OOD accuracy (|ψ| > Θ rule) {100 * self.ood_accuracy_hard_rule:6.2f}%   "
            f"its false-alarm rate {100 * self.false_alarm_rate_hard_rule:.2f}%; "
            f"score at that rate {100 * self.ood_accuracy_score_at_rule_far:.2f}%",
            f"  OOD AUROC                   {self.ood_auroc:8.4f}   "
            f"rotation score alone {self.ood_auroc_rotation_score:.4f}",
            f"  rule with true Θ / true ψ   {100 * self.ood_accuracy_rule_true_level:6.2f}% / "
            f"{100 * self.ood_accuracy_rule_true_pose:.2f}%   (diagnostic: which half limits the rule)",
            f"  level MAE per sample        {self.level_mae_deg:6.2f}°   class-mean {self.level_class_mean_mae_deg:.2f}°",
            f"  false-alarm rate            {100 * self.false_alarm_rate:6.2f}%   (α = {100 * self.alpha:.2f}%)",
        ]
        if self.reflection_auroc is not None:
            lines.append(f"  reflection-OOD AUROC        {self.reflection_auroc:8.4f}   accuracy {100 * (self.reflection_accuracy or 0):.2f}%")
        lines.append("")
        lines.append(f"  {'class':>7} {'n':>5} {'θ true':>7} {'θ pred':>7} {'MAE':>6} {'r true':>6} {'r pred':>6} {'FAR%':>6} {'OOD%':>6} {'rule%':>6}")
        for r in self.per_class:
            lines.append(
                f"  {r.group:>7} {r.n:5d} {r.true_width_deg:7.1f} {r.mean_pred_width_deg:7.1f} {r.level_mae_deg:6.1f} "
                f"{r.true_reflection_rate:6.2f} {r.mean_pred_reflection_rate:6.2f} {100 * r.false_alarm_rate:6.2f} "
                f"{100 * r.ood_accuracy:6.1f} {100 * r.ood_accuracy_hard_rule:6.1f}"
            )
        return "\n".join(lines)


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else float("nan")


def evaluate_bundle(manifest: Manifest, sess, src: Source, spec: DatasetSpec, seed: int = 0, plot: Path | None = None) -> EvalReport:
    from models.export import run_graph

    names, classes = manifest.outputs, src.classes
    norm = lambda x: ((x - manifest.input.mean) / manifest.input.std).numpy().astype(np.float32)  # noqa: E731
    gen = torch.Generator().manual_seed(seed + 7)
    test = repeat(src.test, IN_DIST_DRAWS)
    labels = test.labels.numpy()
    tw, tr = true_levels(spec, test.labels, classes)

    # in-distribution: false alarms and level error
    ang, mir = draw_poses(spec, test.labels, classes, gen)
    a_in = score_arrays(run_graph(sess, names, norm(apply_pose(test.images, ang, mir))), manifest)
    level_err = np.abs(a_in.rotation_level - tw)

    # rotation OOD, the anchor's protocol (no mirrors)
    n = len(src.test.images)
    rot = (torch.rand(n, generator=gen) * 2 - 1) * 180.0
    a_rot = score_arrays(run_graph(sess, names, norm(apply_pose(src.test.images, rot, torch.zeros(n, dtype=torch.bool)))), manifest)
    tw1, _ = true_levels(spec, src.test.labels, classes)
    family = manifest.group.rotation
    true_excess, true_limit = rotation_excess(rot.numpy(), tw1, family)  # cyclic: off the class's group by > period/4
    truth = true_excess > true_limit
    excess, limit = rotation_excess(a_rot.angle_deg, a_rot.rotation_level, family)
    pred, hard = a_rot.ood, excess > limit
    excess_tl, limit_tl = rotation_excess(a_rot.angle_deg, tw1, family)  # learned pose, true level
    excess_tp, limit_tp = rotation_excess(rot.numpy(), a_rot.rotation_level, family)  # true pose, learned level

    # reflection OOD: in-distribution rotation, mirror half of them; OOD = mirrored where the class is never mirrored
    refl_auroc = refl_acc = None
    asym = tr == 0.0
    if manifest.group.reflections and asym.any() and (tr > 0).any():
        ang2, _ = draw_poses(spec, test.labels, classes, gen)
        flip = torch.rand(len(ang2), generator=gen) < 0.5
        a_ref = score_arrays(run_graph(sess, names, norm(apply_pose(test.images, ang2, flip))), manifest)
        t = flip.numpy()[asym]
        refl_auroc = _auroc(t, a_ref.reflection_score[asym])
        refl_acc = float(np.mean(a_ref.ood_reflection[asym] == t))

    rows = []
    for ci, cname in enumerate(classes or ["all"]):
        s_in = labels == ci if classes else np.ones_like(labels, dtype=bool)
        s_rot = src.test.labels.numpy() == ci if classes else np.ones(n, dtype=bool)
        if not s_in.any():
            continue
        rows.append(ClassRow(
            group=cname, n=int(s_in.sum()), true_width_deg=float(tw[s_in][0]), mean_pred_width_deg=float(a_in.rotation_level[s_in].mean()),
            level_mae_deg=float(level_err[s_in].mean()), true_reflection_rate=float(tr[s_in][0]),
            mean_pred_reflection_rate=float(a_in.reflection_level[s_in].mean()), false_alarm_rate=float(a_in.ood[s_in].mean()),
            ood_accuracy=float(np.mean(pred[s_rot] == truth[s_rot])), ood_accuracy_hard_rule=float(np.mean(hard[s_rot] == truth[s_rot])),
        ))  # fmt: skip
    class_means = [abs(r.mean_pred_width_deg - r.true_width_deg) for r in rows]
    excess_in, limit_in = rotation_excess(a_in.angle_deg, a_in.rotation_level, family)
    rule_far = float(np.mean(excess_in > limit_in))  # the rotation rule, as in the OOD protocol
    at_rule_far = np.quantile(a_in.score, 1.0 - rule_far) if rule_far > 0 else np.inf
    report = EvalReport(
        bundle=f"{manifest.name}/{manifest.version}", dataset=spec.name, alpha=manifest.calibration.alpha,
        ood_accuracy=float(np.mean(pred == truth)), ood_accuracy_hard_rule=float(np.mean(hard == truth)),
        false_alarm_rate_hard_rule=rule_far,
        ood_accuracy_score_at_rule_far=float(np.mean((a_rot.score > at_rule_far) == truth)),
        ood_auroc=_auroc(truth, a_rot.score), level_mae_deg=float(level_err.mean()),
        ood_accuracy_rule_true_level=float(np.mean((excess_tl > limit_tl) == truth)),
        ood_accuracy_rule_true_pose=float(np.mean((excess_tp > limit_tp) == truth)),
        ood_auroc_rotation_score=_auroc(truth, a_rot.rotation_score),
        level_class_mean_mae_deg=float(np.mean(class_means)), false_alarm_rate=float(a_in.ood.mean()),
        reflection_auroc=refl_auroc, reflection_accuracy=refl_acc, per_class=rows,
    )  # fmt: skip
    if plot is not None:
        plot_levels(plot, rows, a_in.rotation_level, labels, classes)
    return report


def plot_levels(path: Path, rows: list[ClassRow], pred_width: np.ndarray, labels: np.ndarray, classes: list[str] | None) -> None:
    """Per-class distribution of the learned rotation level, with the true level marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    groups = classes or ["all"]
    data = [pred_width[labels == i] if classes else pred_width for i in range(len(groups))]
    ax.violinplot([d if len(d) else np.zeros(1) for d in data], positions=range(len(groups)), showmedians=True)
    ax.scatter(range(len(rows)), [r.true_width_deg for r in rows], marker="_", s=400, color="crimson", label="true θ")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlabel("class")
    ax.set_ylabel("learned rotation level Θ(x), degrees")
    ax.set_title("Learned per-class symmetry levels (test digits)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_path(bundle_dir: Path, dataset: str | None = None, seed: int = 0, plot: Path | None = None) -> EvalReport:
    from models.datasets import load_spec
    from models.export import session

    manifest = Manifest.load(bundle_dir)
    spec = load_spec(dataset) if dataset else manifest.dataset
    src = load_source(spec, InputSpec.model_validate(manifest.input.model_dump()))
    return evaluate_bundle(manifest, session(bundle_dir / manifest.graph), src, spec, seed=seed, plot=plot)


def dump(report: EvalReport) -> str:
    return json.dumps(report.model_dump(mode="json"), indent=1)
