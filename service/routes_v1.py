"""/v1 routes (score, canonicalize, models, reload), and health and metrics (on their own router).

Handlers stay thin: parse -> decode on a thread -> batcher -> response. Errors are raised as SymguardError
subclasses and turned into responses by api.py's one handler.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.auth import require_admin, require_api
from service.config import Settings
from service.errors import BadRequest
from service.inputs import decode_batch, read_images
from service.metrics import CONTENT_TYPE
from service.registry import Registry
from service.schemas import (
    ErrorBody, ModelInfo, ModelsResponse, ProcessReload, ReadyResponse, ScoreResponse, SelfCheckInfo,
)  # fmt: skip
from service.serving import (
    ERRORS, infer, json_response, model_ref, registry_of, score_one, served_model, upright_png,
)  # fmt: skip

router = APIRouter()
health_router = APIRouter()  # /healthz, /readyz, /metrics: always at the root, even where /v1 moves under a prefix

IMAGE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One or many images: multipart files (any field names), a raw image body, or JSON base64.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}},
                }
            },
        },
    }
}
# The scoring routes read ?model= and check the token themselves: FastAPI's dependency solving (a Depends and a
# Query) cost ~8% of the server's CPU per single-image request (py-spy, BENCHMARKS.md). Documented by hand instead.
MODEL_PARAM_DOC: dict[str, Any] = {
    "name": "model", "in": "query", "required": False,
    "description": "NAME or NAME:VERSION; default: the server's default model",
    "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Model"},
}  # fmt: skip
SCORING_DOC: dict[str, Any] = {**IMAGE_BODY_DOC, "parameters": [MODEL_PARAM_DOC]}


@router.post(
    "/v1/score", tags=["score"], response_model=ScoreResponse, responses=ERRORS, openapi_extra=SCORING_DOC,
    summary="Score one or many images",
)  # fmt: skip
async def score(request: Request) -> Response:
    await require_api(request)
    settings: Settings = request.app.state.settings
    ref = model_ref(request.query_params.get("model"))
    served = served_model(request, ref)
    images = await read_images(request, settings)
    spec = served.runtime.manifest.input
    _, x = await decode_batch(images, spec, settings.max_pixels)
    result = await infer(request, served, x, ref)
    rt = result.runtime  # the version that actually scored (a reload may have swapped it meanwhile)
    body = ScoreResponse(model=rt.name, version=rt.version, provider=rt.provider, results=result.rows)
    return Response(body.model_dump_json().encode(), media_type="application/json")


@router.post(
    "/v1/canonicalize", tags=["score"], responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "the upright image"}},
    openapi_extra=SCORING_DOC, response_class=Response,
    summary="Return the image turned upright and un-mirrored (PNG); its score is in X-Symguard-* headers",
)  # fmt: skip
async def canonicalize_image(request: Request) -> Response:
    await require_api(request)
    settings: Settings = request.app.state.settings
    ref = model_ref(request.query_params.get("model"))
    served = served_model(request, ref)
    images = await read_images(request, settings)
    if len(images) != 1:
        raise BadRequest(f"canonicalize takes exactly one image, got {len(images)}")
    scored = await score_one(request, served, ref, images[0])
    row = scored.row
    png = await run_in_threadpool(upright_png, scored)
    headers = {
        "X-Symguard-Model": row.model, "X-Symguard-Version": str(row.version),
        "X-Symguard-Angle-Deg": f"{row.angle_deg:g}", "X-Symguard-Reflected": str(row.reflected).lower(),
        "X-Symguard-Score": f"{row.score:g}", "X-Symguard-P-Value": f"{row.p_value:g}",
        "X-Symguard-Verdict": row.verdict, "X-Symguard-Reason": row.reason or "none", "X-Symguard-Group": row.group,
    }  # fmt: skip
    return Response(png, media_type="image/png", headers=headers)


@router.get(
    "/v1/models", tags=["models"], response_model=ModelsResponse, summary="Served models, versions and providers"
)
async def list_models(request: Request) -> Response:
    return Response(
        ModelsResponse(models=_model_infos(registry_of(request))).model_dump_json().encode(),
        media_type="application/json",
    )


@router.post(
    "/v1/models/{name}/reload", tags=["models"], response_model=ModelInfo, dependencies=[Depends(require_admin)],
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody},
               409: {"model": ErrorBody, "description": "new version failed verification or self-check; the old one still serves"}},
    summary="Load the newest (or ?version=) version beside the old one, self-check it, then swap (admin)",
)  # fmt: skip
async def reload(request: Request, name: str, version: Annotated[int | None, Query(ge=1)] = None) -> Response:
    reg = registry_of(request)
    _, acks = await reg.reload(name, version)
    info = next(m for m in _model_infos(reg) if m.name == name)
    if acks:
        info.processes = [ProcessReload(pid=a.pid, version=a.version, error=a.error) for a in acks]
    return Response(info.model_dump_json().encode(), media_type="application/json")


@health_router.get("/healthz", tags=["health"], summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@health_router.get(
    "/readyz",
    tags=["health"],
    response_model=ReadyResponse,
    summary="Readiness: a model is loaded and passed its self-check",
)
async def readyz(request: Request) -> Response:
    reg = registry_of(request)
    ready, problems = reg.readiness()
    body = ReadyResponse(
        ready=ready,
        process=os.getpid(),
        models=[
            {"name": n, "version": s.runtime.version, "provider": s.runtime.provider}
            for n, s in sorted(reg.models.items())
        ],
        problems=problems,
    )
    return Response(body.model_dump_json().encode(), 200 if ready else 503, media_type="application/json")


@health_router.get("/metrics", tags=["health"], response_class=Response, summary="Prometheus metrics")
async def metrics_endpoint(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)


def _model_infos(reg: Registry) -> list[ModelInfo]:
    infos: list[ModelInfo] = []
    default = reg.default_name
    for name, s in sorted(reg.models.items()):
        m, c = s.runtime.manifest, s.runtime.self_check
        infos.append(
            ModelInfo(
                name=name, version=m.version, state="serving", provider=s.runtime.provider, default=name == default,
                input=m.input.model_dump(), classes=m.classes, reflections=m.group.reflections, alpha=m.calibration.alpha,
                self_check=SelfCheckInfo(passed=c.passed, equivariance_error=c.equivariance_error, probe_angle_error_deg=c.probe_angle_error_deg,
                                         probe_logit_error=c.probe_logit_error, probes=c.probes) if c else None,
                loaded_at=s.loaded_at, versions_on_disk=reg.repository.versions(name), last_error=reg.last_error.get(name),
            )
        )  # fmt: skip
    for name, why in sorted(reg.unavailable.items()):
        if name != "*" and name not in reg.models:
            infos.append(
                ModelInfo(
                    name=name, state="unavailable", versions_on_disk=reg.repository.versions(name), last_error=why
                )
            )
    return infos
