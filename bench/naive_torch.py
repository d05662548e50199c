"""System A of bench/compare.py: the service a user would write straight from the research code.

The research model is `models.networks.Bundle` (encoder + level head + class head) in eager PyTorch. The default
bundle ships only its ONNX graph (its torch checkpoint lives in the git-ignored runs/), so the torch module is
rebuilt from the graph's initializers. Graphs exported since mnist-multiple-flip/4 keep every parameter under its
state-dict name (no constant folding at export; ONNX Runtime folds at load). In older graphs the named ones
(`encoder.embed.0.weight`, ...) map one to one onto the state dict; the group-conv filter banks and biases are the
raw flattened parameters that feed each `Gather` / `Tile` node, in layer order (the four feature stages, then the
two 1x1 group convs of the pose head), and an older graph's linear pose field is a `MatMul` by its transposed weight.
Pose-posterior graphs (mnist-multiple-flip/5 on) rebuild a `models.polar.PolarEncoder`, its sizes read off the graph.

    python bench/naive_torch.py --check            # parity with ONNX Runtime (max abs diff per output)
    python bench/naive_torch.py --port 8101        # the naive FastAPI app on 127.0.0.1

The app: FastAPI, one eager forward per request (no batching, no ONNX), torch.no_grad, the same decode /
preprocess / scoring code as symguard (only the model runtime and the serving layer differ), pydantic responses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.networks import Bundle, Encoder, LevelHead  # noqa: E402
from models.polar import PolarEncoder  # noqa: E402
from service.manifest import Manifest  # noqa: E402

DEFAULT_BUNDLE = ROOT / "models/repository/mnist-multiple-flip/8"


def torch_from_onnx(graph_path: Path) -> Bundle:
    """Rebuild the eager `Bundle` whose export is `graph_path`."""
    m = onnx.load(str(graph_path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    named = {k: v for k, v in inits.items() if not k.startswith("onnx::")}
    if "encoder.head.1.weight" in named:  # a pose-posterior graph (models/polar.py)
        model = _polar_architecture(named, inits, m)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in named.items()})
        return model.eval()
    if "encoder.features.0.0.weight" in named:  # exported without constant folding: every parameter by name
        pose_hidden = len(named["encoder.pose_head.0.bias"]) if "encoder.pose_head.0.bias" in named else 0
        model = _architecture(named, m, pose_hidden)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in named.items()})
        return model.eval()
    # unnamed: per group conv, the Gather feeds the raw weight, the Tile the raw bias; an old pose field, a MatMul
    gathers, tiles, matmul = [], [], None
    for node in m.graph.node:
        raw = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not raw:
            continue
        if node.op_type == "Gather":
            gathers.append(inits[raw[0]])
        elif node.op_type == "Tile":
            tiles.append(inits[raw[0]])
        elif node.op_type == "MatMul":
            matmul = inits[raw[0]]
    if len(gathers) != len(tiles) or len(gathers) not in (4, 6) or (len(gathers) == 4) != (matmul is not None):
        raise ValueError(f"unexpected graph: {len(gathers)} gathers, {len(tiles)} tiles, matmul={matmul is not None}")
    model = _architecture(named, m, pose_hidden=len(tiles[4]) if len(tiles) == 6 else 0)
    state = model.state_dict()
    for k, v in named.items():
        state[k] = torch.from_numpy(v.copy())
    convs = [f"encoder.features.{i}.0" for i in range(4)] + ["encoder.pose_head.0", "encoder.pose_head.2"]
    for conv, w, b in zip(convs, gathers, tiles):
        state[f"{conv}.weight"] = torch.from_numpy(w.copy()).reshape(state[f"{conv}.weight"].shape)
        state[f"{conv}.bias"] = torch.from_numpy(b.copy()).reshape(state[f"{conv}.bias"].shape)
    if matmul is not None:
        state["encoder.pose_field.weight"] = torch.from_numpy(matmul.T.copy())
    model.load_state_dict(state)
    return model.eval()


def _architecture(named: dict[str, np.ndarray], m: onnx.ModelProto, pose_hidden: int) -> Bundle:
    """An untrained `Bundle` shaped like the graph: channel sizes from the BatchNorm statistics, embedding and
    hidden sizes from the heads, input channels from the graph's input."""
    chans = [len(named[f"encoder.features.{i}.1.bn.weight"]) for i in range(3)]
    embed_dim, hidden = named["encoder.embed.2.weight"].shape[0], named["level.net.0.weight"].shape[0]
    in_ch = m.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    head = torch.nn.Linear(embed_dim, named["class_head.weight"].shape[0]) if "class_head.weight" in named else None
    return Bundle(Encoder(tuple(chans), embed_dim, in_ch, pose_hidden), LevelHead(embed_dim, hidden), head)


def _polar_architecture(named: dict[str, np.ndarray], inits: dict[str, np.ndarray], m: onnx.ModelProto) -> Bundle:
    """An untrained pose-posterior `Bundle` shaped like the graph: fields from the norms, the ring size from the
    head's ring-wide kernel, the radii from the polar sampling taps [radii·angles, 4]."""
    chans = tuple(len(named[f"encoder.features.{i}.1.bn.weight"]) for i in range(4))
    hidden, angles = len(named["encoder.head.0.1.bn.weight"]), named["encoder.head.1.weight"].shape[-1] + 1
    embed_dim, level_hidden = named["encoder.embed.2.weight"].shape[0], named["level.net.0.weight"].shape[0]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    in_ch, size = dims[1].dim_value, dims[2].dim_value
    consts = [numpy_helper.to_array(a.t) for n in m.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"]  # fmt: skip
    taps = next(v for v in [*inits.values(), *consts] if v.ndim == 2 and v.shape[1] == 4 and v.dtype == np.int64)
    enc = PolarEncoder(chans, hidden, embed_dim, in_ch, size, taps.shape[0] // angles, angles)
    enc.pose_at_mode = any(n.op_type == "ArgMax" for n in m.graph.node)  # cyclic bundles read ψ at the mode
    head = torch.nn.Linear(embed_dim, named["class_head.weight"].shape[0]) if "class_head.weight" in named else None
    return Bundle(enc, LevelHead(embed_dim, level_hidden), head)


def parity(model: Bundle, graph_path: Path, x: np.ndarray) -> dict[str, float]:
    """Max |torch − ORT| per output on x. The level's width is compared in units of 180° (as models/export.py
    does: float32 carries ~7 digits), and rows whose reflection logit sits within 1e-3 of the pose switch are
    left out of the pose comparison (the two sides may pick different branches there)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))
    with torch.no_grad():
        got = dict(zip(names, (t.numpy() for t in model(torch.from_numpy(x)))))
    logit = ref["reflection_logit"].reshape(-1)
    safe = np.abs(logit) > 1e-3
    out = {}
    for n in names:
        a, b = got[n].reshape(len(x), -1), ref[n].reshape(len(x), -1)
        if n == "level":
            a, b = a / np.array([180.0, 1.0], np.float32), b / np.array([180.0, 1.0], np.float32)
        if n == "pose":
            a, b = a[safe], b[safe]
        out[n] = float(np.max(np.abs(a - b))) if a.size else 0.0
    return out


def sample_inputs(manifest: Manifest, n: int = 64) -> np.ndarray:
    """n real MNIST digits, decoded and preprocessed exactly as the server does."""
    from bench.workload import digits_png
    from service.decode import decode_image
    from service.preprocess import to_model_input

    return np.stack([to_model_input(decode_image(p, 10**7), manifest.input) for p in digits_png(n)])


def create_app(bundle_dir: Path, threads: int):
    """The naive service: FastAPI + eager torch, one forward per request."""
    from service.decode import decode_image
    from service.preprocess import to_model_input
    from service.scoring import GraphOutputs, score_rows

    torch.set_num_threads(threads)
    manifest = Manifest.model_validate_json((bundle_dir / "manifest.json").read_text())
    model = torch_from_onnx(bundle_dir / manifest.graph)
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict:
        return {"ready": True}

    @app.post("/v1/score")
    async def score(request: Request):  # what a research-code service looks like: parse, forward, answer
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1000)
            blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
        else:
            blobs = [await request.body()]
        x = torch.from_numpy(np.stack([to_model_input(decode_image(b, 16_000_000), manifest.input) for b in blobs]))
        with torch.no_grad():
            o = [t.numpy() for t in model(x)]
        cl = o[4] if model.class_head is not None else None
        rs = o[-1] if model.has_rotation_score else None
        rows = score_rows(GraphOutputs(o[0], o[1].reshape(-1), o[2], o[3], cl, rs), manifest)
        return JSONResponse(
            {
                "model": manifest.name,
                "version": manifest.version,
                "provider": "torch-eager",
                "results": [r.model_dump() for r in rows],
            }
        )

    return app


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--check", action="store_true", help="print the parity with ONNX Runtime and exit (1 if > 1e-4)")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    a = p.parse_args()
    manifest = Manifest.model_validate_json((a.bundle / "manifest.json").read_text())
    if a.check:
        diffs = parity(torch_from_onnx(a.bundle / manifest.graph), a.bundle / manifest.graph, sample_inputs(manifest))
        worst = max(diffs.values())
        print("torch eager vs ONNX Runtime, max abs diff per output:", {k: f"{v:.2e}" for k, v in diffs.items()})
        print(f"worst {worst:.2e} ({'ok' if worst <= 1e-4 else 'TOO LARGE'}, tolerance 1e-4)")
        return 0 if worst <= 1e-4 else 1
    import uvicorn

    uvicorn.run(create_app(a.bundle, a.threads), host="127.0.0.1", port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
