"""System B of bench/compare.py: BentoML with adaptive batching, running the same ONNX graph as symguard.

Runs only in the benchmark's own virtual environment (BentoML is not a symguard dependency):

    python3 -m venv bench/.venv-bentoml
    bench/.venv-bentoml/bin/pip install bentoml onnxruntime==1.32.0 fastapi pillow numpy orjson pydantic \
        pydantic-settings psutil
    cd /path/to/repo && SYMGUARD_BENCH_BUNDLE=models/repository/mnist-multiple-flip/8 \
        bench/.venv-bentoml/bin/bentoml serve bench.bento_service:Front --host 127.0.0.1 --port 8102

Layout, as BentoML's model-composition guide has it:
* `Front` (1 worker process): the HTTP API. A FastAPI app mounted on the service accepts the same requests as
  symguard's /v1/score (a raw image body, or multipart files), decodes and preprocesses with symguard's own
  code on a worker thread, sends the tensor to `Model`, scores the rows with symguard's `score_rows` and answers
  the same JSON (orjson). So per image it does exactly symguard's work; only the serving layer differs.
* `Model` (1 worker process by default; SYMGUARD_BENCH_BENTO_MODEL_WORKERS, compare.py --b-workers): `infer` is a
  batchable BentoML API, so BentoML's adaptive batching (the CORK dispatcher, which learns the batch's execution
  time and decides how long to wait for more) merges the tensors of concurrent requests along axis 0 into one ONNX
  Runtime `session.run`. With several workers, BentoML runs one process each and spreads calls over them.

Batching configuration: max_batch_size = 64 images (two 32-image requests, or 64 single images, per run) and
max_latency_ms = 60,000 (BentoML's default). BentoML's dispatcher cancels any request whose estimated latency
passes max_latency_ms (the model service drops the call, the front answers 500). At 64 clients a request here
legitimately waits seconds in the queue: a first run with max_latency_ms = 10,000 shed 534 of the single-image
and 712 of the 32-image requests at concurrency 64, which measures load shedding, not serving. The ONNX
Runtime session uses symguard's session options (spinning off, all graph optimisations) with
SYMGUARD_BENCH_THREADS intra-op threads per model worker (compare.py: its --threads divided by --b-workers).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.inputs import Encoded, prepare_batch  # noqa: E402
from service.manifest import Manifest  # noqa: E402
from service.scoring import GraphOutputs, score_rows  # noqa: E402

BUNDLE = Path(os.environ.get("SYMGUARD_BENCH_BUNDLE", ROOT / "models/repository/mnist-multiple-flip/8"))
THREADS = int(os.environ.get("SYMGUARD_BENCH_THREADS", "2"))  # ONNX Runtime intra-op threads per model worker
MODEL_WORKERS = int(os.environ.get("SYMGUARD_BENCH_BENTO_MODEL_WORKERS", "1"))  # processes of `Model`
MAX_BATCH = int(os.environ.get("SYMGUARD_BENCH_BENTO_MAX_BATCH", "64"))
MAX_LATENCY_MS = int(os.environ.get("SYMGUARD_BENCH_BENTO_MAX_LATENCY_MS", "60000"))
MANIFEST = Manifest.model_validate_json((BUNDLE / "manifest.json").read_text())
# symguard serves with access_log=False; an access-log line per request would be a cost symguard does not pay
NO_ACCESS_LOG = {"access": {"enabled": False}}
OUTPUTS = [
    n
    for n in (
        MANIFEST.outputs.pose,
        MANIFEST.outputs.reflection_logit,
        MANIFEST.outputs.embedding,
        MANIFEST.outputs.level,
        MANIFEST.outputs.class_logits,
        MANIFEST.outputs.rotation_score,
    )
    if n
]


@bentoml.service(workers=MODEL_WORKERS, logging=NO_ACCESS_LOG)
class Model:
    def __init__(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(BUNDLE / MANIFEST.graph), opts, providers=["CPUExecutionProvider"])

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, x: np.ndarray) -> np.ndarray:
        """[N, C, S, S] float32 -> [N, sum of output widths] float32 (outputs side by side)."""
        outs = self.session.run(OUTPUTS, {MANIFEST.input.name: np.ascontiguousarray(x, dtype=np.float32)})
        return np.concatenate([o.reshape(len(x), -1) for o in outs], axis=1)


app = FastAPI()


def _prepare(blobs: list[bytes]) -> np.ndarray:
    return prepare_batch([Encoded(b, "image") for b in blobs], MANIFEST.input, 16_000_000)  # symguard's own


def _rows(y: np.ndarray) -> list[dict]:
    # columns: pose (2), reflection logit (1), embedding (d), level (2), class logits (k), rotation score (r)
    k = len(MANIFEST.classes or []) if MANIFEST.outputs.class_logits else 0
    r = 1 if MANIFEST.outputs.rotation_score else 0
    d = y.shape[1] - 5 - k - r
    pose, logit, emb, level = y[:, 0:2], y[:, 2], y[:, 3 : 3 + d], y[:, 3 + d : 5 + d]
    cl = y[:, 5 + d : 5 + d + k] if k else None
    out = GraphOutputs(pose, logit, emb, level, cl, y[:, -1] if r else None)
    return [r.model_dump() for r in score_rows(out, MANIFEST)]


@app.get("/readyz")
async def readyz() -> dict:
    return {"ready": True}


@app.post("/v1/score")
async def score(request: Request) -> Response:
    front = bentoml.get_current_service()
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1000)
        blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
        await form.close()
    else:
        blobs = [await request.body()]
    x = await run_in_threadpool(_prepare, blobs)
    y = await front.model.to_async.infer(x)
    rows = await run_in_threadpool(_rows, np.asarray(y))
    body = {"model": MANIFEST.name, "version": MANIFEST.version, "provider": "bentoml+ort", "results": rows}
    return Response(orjson.dumps(body), media_type="application/json")


@bentoml.service(workers=1, logging=NO_ACCESS_LOG)
@bentoml.asgi_app(app, path="/")
class Front:
    model = bentoml.depends(Model)
