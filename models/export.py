"""Export a trained run as an immutable, versioned bundle: REPO/NAME/VERSION/{model.onnx, manifest.json}.

Steps: trace to ONNX -> check torch/ORT parity on real digits -> measure equivariance on the ONNX graph ->
calibrate thresholds on held-out in-distribution data with the server's own scoring code -> pick probes ->
evaluate -> write the manifest with every file's sha256, then move the folder into place in one rename.
"""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
from PIL import Image

from models.datasets import MNIST_INPUT, Source, apply_pose, load_source, repeat, sample
from models.networks import Bundle, LevelHead, plane_matrix
from models.polar import PolarEncoder
from service.geometry import D4, apply_d4
from service.manifest import (
    Calibration,
    DatasetSpec,
    FileEntry,
    GroupSpec,
    InputSpec,
    Manifest,
    OutputNames,
    Probe,
    sha256_file,
)
from service.scoring import GraphOutputs, assign_groups, calibrate_groups, nonconformity

OPSET = 17
GRAPH_FILE = "model.onnx"
PARITY_TOL = 1e-4
CALIBRATION_DRAWS = 8  # poses drawn per held-out calibration source image


# ---------------------------------------------------------------- graph


def export_onnx(model: Bundle, path: Path, spec: InputSpec) -> OutputNames:
    names = OutputNames(class_logits="class_logits" if model.class_head is not None else None,
                        rotation_score="rotation_score" if model.has_rotation_score else None)  # fmt: skip
    out_names = [n for n in (names.pose, names.reflection_logit, names.embedding, names.level, names.class_logits,
                             names.rotation_score) if n is not None]  # fmt: skip
    dummy = torch.zeros(2, spec.channels, spec.size, spec.size)
    # No constant folding here: every parameter keeps its state-dict name in the graph (bench/naive_torch.py rebuilds
    # the torch model from them), and ONNX Runtime folds the filter-bank and norm arithmetic into constants at load.
    torch.onnx.export(
        model.eval(), (dummy,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=False,
        input_names=[spec.name], output_names=out_names,
        dynamic_axes={spec.name: {0: "batch"}, **{n: {0: "batch"} for n in out_names}},
    )  # fmt: skip
    return names


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_graph(sess: ort.InferenceSession, names: OutputNames, x: np.ndarray, batch: int = 512) -> GraphOutputs:
    parts = []
    fields = [names.pose, names.reflection_logit, names.embedding, names.level, names.class_logits,
              names.rotation_score]  # fmt: skip
    wanted = [n for n in fields if n is not None]
    for i in range(0, len(x), batch):
        o = sess.run(wanted, {sess.get_inputs()[0].name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})
        got = dict(zip(wanted, o))
        parts.append(GraphOutputs(*(None if n is None else got[n] for n in fields)))
    return GraphOutputs.concat(parts)


def parity(model: Bundle, sess: ort.InferenceSession, names: OutputNames, x: torch.Tensor) -> dict[str, float]:
    """Max |torch - ORT| per output. The level width is compared as a fraction of 180° (float32 carries ~7 digits,
    so degrees near 180 cannot agree to 1e-4 absolute); rows whose reflection logit is within 1e-3 of the switch
    between pose hypotheses are skipped for the pose."""
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    got = run_graph(sess, names, x.numpy())
    safe = np.abs(ref[1]) > 1e-3
    scale = np.array([180.0, 1.0], dtype=np.float32)
    diffs = {
        "pose": float(np.abs(ref[0][safe] - got.pose[safe]).max(initial=0.0)),
        "reflection_logit": float(np.abs(ref[1] - got.reflection_logit).max()),
        "embedding": float(np.abs(ref[2] - got.embedding).max()),
        "level": float(np.abs((ref[3] - got.level) / scale).max()),
    }
    rest = iter(ref[4:])
    if got.class_logits is not None:
        diffs["class_logits"] = float(np.abs(next(rest) - got.class_logits).max())
    if got.rotation_score is not None:
        diffs["rotation_score"] = float(np.abs(next(rest) - got.rotation_score).max())
    return diffs


# ---------------------------------------------------------------- equivariance, measured on the exported graph


def pose_matrices(out: GraphOutputs) -> np.ndarray:
    """ρ(ψ) = R_φ M^m for every row, [N,2,2]."""
    u = out.pose / np.maximum(np.linalg.norm(out.pose, axis=1, keepdims=True), 1e-12)
    r = np.stack([np.stack([u[:, 0], -u[:, 1]], -1), np.stack([u[:, 1], u[:, 0]], -1)], 1)
    m = np.where((out.reflection_logit > 0)[:, None, None], np.diag([-1.0, 1.0])[None], np.eye(2)[None])
    return r @ m


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """mean over rows of ‖a - b‖ / (‖a‖ + ‖b‖)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.linalg.norm(a - b, axis=1) / (np.linalg.norm(a, axis=1) + np.linalg.norm(b, axis=1) + 1e-12)))


def equivariance_errors(sess: ort.InferenceSession, names: OutputNames, x: np.ndarray) -> dict[str, float]:
    """Relative error of the pose (as an O(2) matrix) and of the invariant embedding, per symmetry type.

    rot90 and flip are exact by construction (expect ~1e-7); rot45 is approximate, as with any grid-based network.
    """
    base = run_graph(sess, names, x)
    rho = pose_matrices(base)
    errs: dict[str, list[float]] = {"rot90": [], "flip": []}
    emb_errs: dict[str, list[float]] = {"rot90": [], "flip": []}
    for k, f in D4[1:]:
        gx = apply_d4(x, k, f)
        out = run_graph(sess, names, gx)
        expect = plane_matrix((k, f))[None] @ rho
        key = "flip" if f else "rot90"
        errs[key].append(relative_error(pose_matrices(out), expect))
        emb_errs[key].append(relative_error(out.embedding, base.embedding))
    # 45°: interpolated rotation of the image about the centre pixel
    t = torch.from_numpy(x)
    x45 = apply_pose(t, torch.full((len(t),), 45.0), torch.zeros(len(t), dtype=torch.bool)).numpy()
    out45 = run_graph(sess, names, x45)
    c = s = np.sqrt(0.5)
    r45 = np.array([[c, -s], [s, c]])
    return {
        "rot90": float(np.max(errs["rot90"])),
        "flip": float(np.max(errs["flip"])),
        "rot45": relative_error(pose_matrices(out45), r45[None] @ rho),
        "embedding_rot90": float(np.max(emb_errs["rot90"])),
        "embedding_flip": float(np.max(emb_errs["flip"])),
        "embedding_rot45": relative_error(out45.embedding, base.embedding),
    }


# ---------------------------------------------------------------- calibration and probes


def distinct(x: np.ndarray) -> np.ndarray:
    """Indices of the distinct images of a batch, in their first order. The calibration draws of a digit from a
    class that is never turned nor mirrored are one image 8 times; counted 8 times, ~50 scores would pass for the
    200 that a per-class threshold at α/2 needs, and the threshold would not hold (models/RESULTS.md, mnist/4)."""
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    return np.sort(first)


def calibrate(
    sess, names, src: Source, spec: DatasetSpec, classes, centroids, alpha: float, min_level: float, seed: int,
    family: str = "uniform",
):
    gen = torch.Generator().manual_seed(seed + 101)
    pool = repeat(src.calib, CALIBRATION_DRAWS if spec.augment else 1)
    drawn = sample(spec, pool, src.classes, gen)[0].numpy()
    keep = distinct(drawn)
    x, sources = drawn[keep], keep % len(src.calib.images)  # `repeat` tiles the split: draw i is of digit i mod n
    out = run_graph(sess, names, x)
    _, _, s_rot, s_ref = nonconformity(out, min_level, family)
    if classes and names.class_logits:
        group_by, group_names = "class", list(classes)
    elif centroids:
        group_by, group_names = "cluster", [f"cluster-{i}" for i in range(len(centroids))]
    else:
        group_by, group_names = "global", ["all"]
    stub = Calibration(alpha=alpha, group_by=group_by, min_level_deg=min_level, groups=[], centroids=centroids)
    gidx = assign_groups(out, stub, classes)
    groups = calibrate_groups(group_names, gidx, s_rot, s_ref, alpha, sources=sources)
    return stub.model_copy(update={"groups": groups})


def to_png_b64(img01: np.ndarray) -> str:
    """[C,S,S] float in [0,1] -> base64 PNG (8-bit)."""
    arr = np.clip(np.round(img01 * 255.0), 0, 255).astype(np.uint8)
    pil = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_probes(sess, names, spec: InputSpec, images01: np.ndarray, n: int = 4, margin: float = 0.05) -> list[Probe]:
    """Probes are stored 8-bit, so their expected outputs are computed from the 8-bit pixels the server will read.

    Only images whose reflection logit is clearly away from 0 qualify: the graph picks the pose hypothesis by its
    sign, so a probe on the boundary would make the server's self-check flaky.
    """
    q = np.clip(np.round(images01[: 16 * n] * 255.0), 0, 255) / 255.0
    out = run_graph(sess, names, ((q - spec.mean) / spec.std).astype(np.float32))
    order = np.argsort(-np.abs(out.reflection_logit))
    keep = np.sort(order[: max(1, min(n, int((np.abs(out.reflection_logit) > margin).sum())))])
    q, out = q[keep], out.take(keep)
    angle = np.degrees(np.arctan2(out.pose[:, 1], out.pose[:, 0]))
    return [Probe(png_base64=to_png_b64(q[i]), angle_deg=float(angle[i]), reflection_logit=float(out.reflection_logit[i])) for i in range(len(q))]


# ---------------------------------------------------------------- the bundle


def next_version(repo: Path, name: str) -> int:
    d = repo / name
    versions = [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()] if d.is_dir() else []
    return max(versions, default=0) + 1


def build_bundle(
    model: Bundle, src: Source, spec: DatasetSpec, repo: Path, name: str, *, classes: list[str] | None,
    centroids: list[list[float]] | None, family: str, version: int | None = None, alpha: float = 0.01,
    min_level: float = 5.0, seed: int = 0, description: str = "", evaluate: bool = True, extra_metrics: dict | None = None,
) -> Path:
    """Write REPO/NAME/VERSION atomically and return its path."""
    repo = Path(repo)
    version = version or next_version(repo, name)
    final = repo / name / str(version)
    if final.exists():
        raise FileExistsError(f"{final} exists: bundles are immutable, export a new version")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by whoever runs the server
    try:
        in_spec = src.input.model_copy(update={"name": "image"})
        names = export_onnx(model, tmp / GRAPH_FILE, in_spec)
        sess = session(tmp / GRAPH_FILE)
        probe_x = src.calib.images[:64]
        diffs = parity(model, sess, names, probe_x)
        diff = max(diffs.values())
        if diff > PARITY_TOL:
            raise RuntimeError(f"torch vs ONNX Runtime parity {diffs} exceeds {PARITY_TOL:.0e}")
        eq = equivariance_errors(sess, names, probe_x.numpy())
        cal = calibrate(sess, names, src, spec, classes, centroids, alpha, min_level, seed, family)
        manifest = Manifest(
            name=name, version=version, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            description=description, input=in_spec, group=GroupSpec(rotation=family, reflections=True), outputs=names,
            graph=GRAPH_FILE, classes=classes, calibration=cal, dataset=spec, equivariance_error=eq,
            probes=make_probes(sess, names, in_spec, src.calib.images.numpy()),
            metrics={"parity_max_abs_diff": diff, **(extra_metrics or {})},
            files=[FileEntry(path=GRAPH_FILE, sha256=sha256_file(tmp / GRAPH_FILE))],
        )  # fmt: skip
        if evaluate:
            from models.eval import evaluate_bundle

            report = evaluate_bundle(manifest, sess, src, spec, seed=seed)
            manifest = manifest.model_copy(update={"metrics": {**manifest.metrics, **report.headline()}})
        manifest.write(tmp)
        tmp.rename(final)  # one rename: readers never see a half-written bundle
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def export_run(checkpoint: Path, repo: Path, name: str | None = None, version: int | None = None, alpha: float = 0.01) -> Path:
    """A finished `symguard train` run -> bundle."""
    from models.datasets import load_spec  # noqa: F401  (spec comes from the checkpoint)
    from models.train import load_checkpoint

    enc, level, head, ck = load_checkpoint(checkpoint)
    spec = DatasetSpec.model_validate(ck["spec"])
    src = load_source(spec, InputSpec.model_validate(ck["input"]))
    metrics = {"train_seconds": float(ck.get("train_seconds", 0.0))}
    return build_bundle(
        Bundle(enc, level, head), src, spec, repo, name or spec.name, classes=ck["classes"] if head is not None else None,
        centroids=ck["centroids"], family=ck["family"], version=version, alpha=alpha,
        description=f"trained on {spec.name} with `symguard train`", extra_metrics=metrics,
    )  # fmt: skip


def write_test_bundle(repo: Path, name: str = "digits", version: int = 1, seed: int = 0) -> Path:
    """A small untrained bundle for tests: exactly equivariant (by construction), calibrated on real digits, no eval."""
    torch.manual_seed(seed)
    from models.datasets import load_spec

    spec = load_spec("mnist-multiple-flip")
    src = load_source(spec, MNIST_INPUT)
    src = Source(src.train, repeat(src.calib, 1), src.test, src.classes, src.input)
    # 64 angle bins (the default is 32 since v6): the service tests' preconditions (some D4 poses of their digits
    # called OOD by this untrained net, others not) were settled on this draw of weights
    model = Bundle(PolarEncoder((4, 8, 8, 8), 8, 16, angles=64), LevelHead(16, 32), nn.Linear(16, 10))
    return build_bundle(model, src, spec, repo, name, classes=src.classes, centroids=None, family="uniform",
                        version=version, seed=seed, description="untrained test bundle", evaluate=False)  # fmt: skip
