"""KServe V2 / Open Inference Protocol (JSON). Inputs: one FP32 tensor [N,C,S,S] already preprocessed and normalised
as the manifest says, or one BYTES tensor [N] of base64-encoded image files (decoded and preprocessed like /v1).
Outputs: the graph's own tensors (pose, reflection_logit, embedding, level, class_logits, rotation_score), via the
same batcher.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Path, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service import __version__
from service.auth import require_api
from service.decode import decode_base64
from service.errors import BadRequest, InvalidTensor, ModelNotFound, ModelNotReady, TooManyImages
from service.inputs import Encoded, prepare_batch
from service.manifest import is_safe_name
from service.registry import Served
from service.schemas import V2InferRequest, V2InferResponse, V2ModelMetadata, V2TensorMeta
from service.serving import ERRORS, infer, json_response, model_ref, registry_of, served_model

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

ModelName = Annotated[str, Path(description="model name")]
_ORT_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


def _ref(name: str, version: str | None) -> str:
    if not is_safe_name(name):  # the path's {name} is a name, not a NAME:VERSION reference
        raise ModelNotFound(f"{name[:100]!r} is not a model name ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
    return f"{name}:{version}" if version is not None else name


@router.get("", summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "symguard", "version": __version__, "extensions": []})


@router.get("/health/live", summary="Server live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="Server ready")
async def ready(request: Request) -> Response:
    ok, _ = registry_of(request).readiness()
    return json_response({"ready": ok}, 200 if ok else 503)


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=ERRORS, summary="Model metadata")
@router.get(
    "/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=ERRORS, include_in_schema=False
)
async def model_metadata(request: Request, name: ModelName, version: str | None = None) -> Response:
    served = served_model(request, model_ref(_ref(name, version)))
    return Response(_metadata(served).model_dump_json().encode(), media_type="application/json")


@router.get("/models/{name}/ready", responses=ERRORS, summary="Model ready")
@router.get("/models/{name}/versions/{version}/ready", responses=ERRORS, include_in_schema=False)
async def model_ready(request: Request, name: ModelName, version: str | None = None) -> Response:
    served = served_model(request, model_ref(_ref(name, version)))
    return json_response({"name": name, "ready": True, "version": str(served.runtime.version)})


@router.post(
    "/models/{name}/infer", response_model=V2InferResponse, responses=ERRORS, dependencies=[Depends(require_api)],
    summary="Run the graph: FP32 [N,C,S,S] preprocessed input, or BYTES [N] base64 image files",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": V2InferRequest.model_json_schema()}}}},
)  # fmt: skip
@router.post("/models/{name}/versions/{version}/infer", dependencies=[Depends(require_api)], include_in_schema=False)
async def model_infer(request: Request, name: ModelName, version: str | None = None) -> Response:
    ref = model_ref(_ref(name, version))
    served = served_model(request, ref)
    try:
        req = V2InferRequest.model_validate_json(await request.body())
    except ValidationError as e:
        first = e.errors()[0]
        raise BadRequest(
            f"not a V2 inference request: {'.'.join(str(p) for p in first['loc']) or 'body'}: {first['msg']}"
        ) from None
    x = await run_in_threadpool(_input_array, req, served, request.app.state.settings)
    result = await infer(request, served, x, ref)
    out = result.outputs
    rt = result.runtime
    names = rt.manifest.outputs
    tensors = {
        names.pose: out.pose,
        names.reflection_logit: out.reflection_logit,
        names.embedding: out.embedding,
        names.level: out.level,
    }
    if names.class_logits and out.class_logits is not None:
        tensors[names.class_logits] = out.class_logits
    if names.rotation_score and out.rotation_score is not None:
        tensors[names.rotation_score] = out.rotation_score
    wanted = [o.name for o in req.outputs] if req.outputs else list(tensors)
    unknown = [w for w in wanted if w not in tensors]
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; the graph has {list(tensors)}")
    body = {
        "model_name": rt.name,
        "model_version": str(rt.version),
        "id": req.id,
        "outputs": [
            {
                "name": w,
                "datatype": "FP32",
                "shape": list(tensors[w].shape),
                "data": np.ascontiguousarray(tensors[w], np.float32).ravel(),
            }
            for w in wanted
        ],
    }
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def _input_array(req: V2InferRequest, served: Served, settings) -> np.ndarray:
    """The one input tensor -> normalised float32 [N, C, S, S] (blocking: runs on a worker thread)."""
    t = req.inputs[0]
    spec = served.runtime.manifest.input
    if t.datatype == "BYTES":
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or t.shape[0] != len(t.data):
            raise InvalidTensor(
                f"BYTES input must have shape [N] (or [N,1]) matching its {len(t.data)} elements, got {t.shape}"
            )
        if len(t.data) > settings.max_images:
            raise TooManyImages(f"{len(t.data)} images in one request; the limit is {settings.max_images}")
        if not t.data:
            raise InvalidTensor("BYTES input holds no image")
        images = [Encoded(decode_base64(d, f"{t.name}[{i}]"), f"{t.name}[{i}]") for i, d in enumerate(t.data)]
        return prepare_batch(images, spec, settings.max_pixels)
    if t.datatype != "FP32":
        raise InvalidTensor(
            f"input datatype {t.datatype!r} is not accepted; send FP32 [N,{spec.channels},{spec.size},{spec.size}] or BYTES [N]"
        )
    want = [spec.channels, spec.size, spec.size]
    if len(t.shape) != 4 or t.shape[1:] != want or not 1 <= t.shape[0] <= settings.max_images:
        raise InvalidTensor(
            f"FP32 input must have shape [N,{','.join(map(str, want))}] with 1 <= N <= {settings.max_images}, got {t.shape}"
        )
    try:
        x = np.asarray(t.data, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidTensor("FP32 data must be numbers (flat, or nested to the declared shape)") from None
    if x.size != int(np.prod(t.shape)):
        raise InvalidTensor(f"FP32 data has {x.size} values; shape {t.shape} needs {int(np.prod(t.shape))}")
    if not np.isfinite(x).all():
        raise InvalidTensor("FP32 data holds NaN or infinity")
    return x.reshape(t.shape)


def _metadata(served: Served) -> V2ModelMetadata:
    rt = served.runtime
    if rt.session is None:  # pragma: no cover - a served runtime always has a session
        raise ModelNotReady(f"{rt.name} has no session")

    def meta(node) -> V2TensorMeta:
        shape = [d if isinstance(d, int) else -1 for d in node.shape]
        return V2TensorMeta(name=node.name, datatype=_ORT_TYPES.get(node.type, node.type), shape=shape)

    return V2ModelMetadata(
        name=rt.name,
        versions=[str(rt.version)],
        platform="onnxruntime_onnx",
        inputs=[meta(i) for i in rt.session.get_inputs()],
        outputs=[meta(o) for o in rt.session.get_outputs() if o.name in rt.outputs],
    )
