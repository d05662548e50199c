"""One bundle in ONNX Runtime: session, real execution provider, startup self-check, and synchronous inference.

Everything here blocks; callers on the event loop go through batching.py, which runs it on a worker thread.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.errors import BundleError, CudaUnavailable, SelfCheckFailed
from service.geometry import D4, apply_d4, compose, wrap_deg
from service.manifest import Manifest
from service.preprocess import normalise
from service.repository import Bundle
from service.scoring import GraphOutputs, ImageScore, score_rows

log = logging.getLogger("symguard.runtime")

WANTED_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
# cuDNN's default search times every convolution algorithm once per new input shape; the batcher's batches come in
# every size from 1 to max_batch, so on an H100 a batch took ~70 ms instead of ~1 ms until each size had been seen
# (BENCHMARKS.md "GPU"). The heuristic picks without timing.
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}}
EQUIVARIANCE_TOL = 1e-3  # relative error; exact D4 graphs measure ~1e-6 in float32
PROBE_ANGLE_TOL_DEG = 0.1
PROBE_LOGIT_TOL = 1e-3
SWITCH_EPS = 1e-4  # |reflection logit| below this: the pose branch is a coin toss, so its pose is not compared


@dataclass(frozen=True)
class SelfCheck:
    equivariance_error: dict[str, float]  # "rot90" / "flip" -> worst relative error over outputs and probes
    probe_angle_error_deg: float
    probe_logit_error: float
    probes: int
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def cuda_fell_back(provider: str) -> bool:
    """True when this ONNX Runtime build offers CUDA but a session ended up on `provider` instead (drivers, cuDNN)."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and provider != "CUDAExecutionProvider"


class ModelRuntime:
    def __init__(self, bundle: Bundle, intra_op_threads: int, require_cuda: bool = False) -> None:
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin by default; on a server that also decodes and speaks HTTP, that steals the CPU.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Ask only for providers this build has (asking for more just logs a warning); whether CUDA then really
        # initialises (drivers, cuDNN) is only known from get_providers(), which is what we report.
        requested = [p for p in WANTED_PROVIDERS if p in ort.get_available_providers()] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(
                str(bundle.graph), sess_options=opts, providers=[(p, PROVIDER_OPTIONS.get(p, {})) for p in requested]
            )
        except Exception as e:  # ORT raises its own zoo (InvalidProtobuf, Fail, ...) for a bad graph
            raise BundleError(f"ONNX Runtime cannot load {bundle.graph.name}: {e}") from None
        self.provider = self.session.get_providers()[0]
        if require_cuda and self.provider != "CUDAExecutionProvider":
            raise CudaUnavailable(
                f"require_cuda is set but ONNX Runtime runs on {self.provider} "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu and check CUDA/cuDNN"
            )
        self._check_signature()
        self.outputs = [o for o in self._output_names() if o is not None]
        self.self_check: SelfCheck | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def _output_names(self) -> list[str | None]:
        o = self.manifest.outputs
        return [o.pose, o.reflection_logit, o.embedding, o.level, o.class_logits, o.rotation_score]

    def _check_signature(self) -> None:
        spec = self.manifest.input
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != spec.name:
            raise BundleError(f"graph inputs {[i.name for i in inputs]} do not match the manifest's {spec.name!r}")
        shape = inputs[0].shape
        if len(shape) != 4 or [d for d in shape[1:]] != [spec.channels, spec.size, spec.size]:
            raise BundleError(
                f"graph input shape {shape} does not match [N, {spec.channels}, {spec.size}, {spec.size}]"
            )
        if isinstance(shape[0], int):  # dynamic axes come back as a name (or None)
            raise BundleError(
                f"graph input {spec.name!r} has a fixed batch size of {shape[0]}; the server batches requests, "
                "so export the graph with a dynamic batch axis"
            )
        have = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self._output_names() if n is not None and n not in have]
        if missing:
            raise BundleError(f"graph lacks outputs {missing} named in the manifest")

    # ---- inference

    def infer(self, x: np.ndarray) -> GraphOutputs:
        """x: float32 [N, C, S, S], already normalised. One session.run."""
        o = self.session.run(self.outputs, {self.manifest.input.name: np.ascontiguousarray(x, dtype=np.float32)})
        if any(len(v) != len(x) for v in o):  # rows are matched to requests by position: never guess
            raise RuntimeError(f"the graph returned {[len(v) for v in o]} rows for {len(x)} image(s)")
        got = dict(zip(self.outputs, o))
        names = self.manifest.outputs
        rotation_score = got.get(names.rotation_score)  # optional outputs: absent names map to None
        return GraphOutputs(
            pose=o[0],
            reflection_logit=o[1].reshape(-1),
            embedding=o[2],
            level=o[3],
            class_logits=got.get(names.class_logits),
            rotation_score=None if rotation_score is None else rotation_score.reshape(-1),
        )

    def score(self, x: np.ndarray) -> tuple[GraphOutputs, list[ImageScore]]:
        out = self.infer(x)
        return out, score_rows(out, self.manifest)

    # ---- startup self-check

    def check(self) -> SelfCheck:
        """Run the manifest's probes through every D4 element and compare with ρ(g)·f(x); also against stored values."""
        spec = self.manifest.input
        if not self.manifest.probes:
            result = SelfCheck({}, math.nan, math.nan, 0, ["manifest has no probes to check the graph with"])
            self.self_check = result
            return result
        x = np.stack(
            [normalise(_probe_image(p.png_base64, spec.size, spec.channels), spec) for p in self.manifest.probes]
        )
        try:
            base = self.infer(x)
            moved = {g: self.infer(apply_d4(x, *g)) for g in D4[1:]}
        except Exception as e:  # ORT's own exception zoo, or rows that do not match the inputs
            result = SelfCheck({}, math.nan, math.nan, len(x), [f"the graph fails on the probes: {e}"])
            self.self_check = result
            return result
        problems: list[str] = []

        angle = np.degrees(np.arctan2(base.pose[:, 1], base.pose[:, 0]))
        stored_angle = np.array([p.angle_deg for p in self.manifest.probes])
        stored_logit = np.array([p.reflection_logit for p in self.manifest.probes])
        decided = np.abs(stored_logit) > SWITCH_EPS
        angle_err = float(np.max(np.abs(wrap_deg(angle - stored_angle))[decided], initial=0.0))
        logit_err = float(np.max(np.abs(base.reflection_logit - stored_logit) / (1.0 + np.abs(stored_logit))))
        if angle_err > PROBE_ANGLE_TOL_DEG:
            problems.append(
                f"probe angles differ from the manifest by up to {angle_err:.3g}° (tolerance {PROBE_ANGLE_TOL_DEG}°)"
            )
        if logit_err > PROBE_LOGIT_TOL:
            problems.append(
                f"probe reflection logits differ from the manifest by up to {logit_err:.3g} (tolerance {PROBE_LOGIT_TOL})"
            )

        errors = {"rot90": 0.0, "flip": 0.0}
        for (k, mirrored), out in moved.items():
            err = equivariance_error(base, out, k, mirrored)
            key = "flip" if mirrored else "rot90"
            errors[key] = max(errors[key], err)
        for key, err in errors.items():
            if not err <= EQUIVARIANCE_TOL:  # also catches NaN
                problems.append(f"{key} equivariance error {err:.3g} exceeds {EQUIVARIANCE_TOL:g}")
        result = SelfCheck(errors, angle_err, logit_err, len(x), problems)
        self.self_check = result
        return result


def equivariance_error(base: GraphOutputs, moved: GraphOutputs, k: int, mirrored: bool) -> float:
    """Worst relative error ‖f(gx) − ρ(g)f(x)‖ / (‖f(gx)‖ + ‖ρ(g)f(x)‖) over the four outputs, for g = (90k, mirrored)."""
    # Pose: ψ(gx) = g·ψ(x), i.e. angle -> 90k + (-1)^m φ; the norm is kept, so rotate the raw (cos, sin) vector.
    angle = np.degrees(np.arctan2(base.pose[:, 1], base.pose[:, 0]))
    reflected = base.reflection_logit > 0
    moved_angle = np.array([compose((90.0 * k, mirrored), (a, r))[0] for a, r in zip(angle, reflected)])
    norm = np.linalg.norm(base.pose, axis=1)
    expect_pose = np.stack([np.cos(np.radians(moved_angle)), np.sin(np.radians(moved_angle))], 1) * norm[:, None]
    # The graph picks its pose branch by the sign of the reflection logit; skip rows sitting on that switch.
    safe = np.abs(base.reflection_logit) > SWITCH_EPS
    sign = -1.0 if mirrored else 1.0
    pairs = [
        (moved.pose[safe], expect_pose[safe]),
        (moved.reflection_logit, sign * base.reflection_logit),
        (moved.embedding, base.embedding),
        (moved.level, base.level),
    ]
    return max(relative_error(a, b) for a, b in pairs)


# Outputs smaller than this (RMS per element) count as zero: a bundle trained on upright data learns levels of
# ~1e-7, and float32 noise of that size, divided by their own norm, read as a 7% equivariance error.
ZERO_FLOOR = 1e-4


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size == 0:
        return 0.0
    denom = max(np.linalg.norm(a) + np.linalg.norm(b), ZERO_FLOOR * np.sqrt(a.size))
    return float(np.linalg.norm(a - b) / denom)


def _probe_image(png_base64: str, size: int, channels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(base64.b64decode(png_base64)))
        img.load()
    except Exception as e:
        raise SelfCheckFailed(f"a probe image in the manifest cannot be decoded: {e}") from None
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        raise SelfCheckFailed(f"probe is {img.size[0]}x{img.size[1]}, the model wants {size}x{size}")
    return img


def load(bundle: Bundle, intra_op_threads: int, require_cuda: bool = False) -> ModelRuntime:
    """Load and self-check; raises BundleError (or a subclass) if the model must not serve."""
    rt = ModelRuntime(bundle, intra_op_threads, require_cuda)
    check = rt.check()
    if not check.passed:
        raise SelfCheckFailed(
            f"{rt.name}:{rt.version} failed its self-check: " + "; ".join(check.problems),
            equivariance_error=check.equivariance_error,
        )
    cuda_note = (
        ""
        if rt.provider == "CUDAExecutionProvider"
        else f" (CUDA requested; available providers: {', '.join(ort.get_available_providers())})"
    )
    log.info(
        "model %s:%s ready: provider=%s%s threads=%d equivariance_error rot90=%.2g flip=%.2g over %d probes",
        rt.name, rt.version, rt.provider, cuda_note, intra_op_threads,
        check.equivariance_error["rot90"], check.equivariance_error["flip"], check.probes,
    )  # fmt: skip
    return rt
