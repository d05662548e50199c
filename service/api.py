"""The HTTP application: /v1 (score, canonicalize, models), health, metrics; /v2 lives in kserve.py.

Handlers stay thin: parse -> decode on a thread -> batcher -> response. Every error is a SymguardError and is
turned into a response by exactly one handler below.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service import __version__
from service.auth import require_admin, require_api
from service.batching import Result
from service.config import Settings
from service.errors import BadRequest, InferenceTimeout, ShuttingDown, SymguardError, error_response
from service.geometry import canonicalize
from service.preprocess import to_mode
from service.inputs import decode_all, read_images, to_batch
from service.metrics import CONTENT_TYPE, Metrics
from service.middleware import BodyLimit, RequestMetrics
from service.registry import Registry, Served
from service.repository import ModelRef
from service.schemas import ErrorBody, ModelInfo, ModelsResponse, ReadyResponse, ScoreResponse, SelfCheckInfo

log = logging.getLogger("symguard.api")

IMAGE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One or many images: multipart files (any field names), a raw image body, or JSON base64.",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {"type": "object", "required": ["images"], "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"}}}}
            },
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in {
        404: "unknown model",
        413: "body, pixel count or image count over the limit",
        415: "not an accepted media type or image format",
        422: "undecodable image, bad base64, malformed body",
        503: "queue full (Retry-After) or model not ready",
    }.items()
}


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type="application/json")


# ---------------------------------------------------------------- app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings, metrics)
        app.state.registry = registry
        await registry.start()
        try:
            yield
        finally:
            await registry.close()  # queued requests finish before the workers stop

    app = FastAPI(
        title="symguard",
        version=__version__,
        description="Per-image rotation/reflection out-of-distribution detection, served from ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts the body-limit 413s too
    _install_error_handlers(app)
    app.include_router(_v1_router())
    from service.kserve import router as v2_router

    app.include_router(v2_router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SymguardError)
    async def typed(_: Request, exc: SymguardError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> Response:
        return json_response({"error": str(exc.detail), "code": f"http_{exc.status_code}"}, exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errs[:5])
        return json_response({"error": msg, "code": "invalid_request"}, 422)


# ---------------------------------------------------------------- helpers shared with kserve.py


def registry_of(request: Request) -> Registry:
    return request.app.state.registry


def model_ref(model: str | None) -> ModelRef | None:
    return ModelRef.parse(model) if model else None


def served_model(request: Request, ref: ModelRef | None) -> Served:
    return registry_of(request).get(ref)


async def infer(request: Request, served: Served, x: Any, ref: ModelRef | None) -> Result:
    """Submit to the model's batcher and wait, bounded by request_timeout_s.

    A reload may retire `served` between lookup and submit; then the request moves to the version now serving
    (if the request did not pin the old one and the input format is unchanged) instead of failing.
    """
    timeout = request.app.state.settings.request_timeout_s
    try:
        try:
            return await asyncio.wait_for(served.batcher.submit(x), timeout)
        except ShuttingDown:
            current = registry_of(request).get(ref)
            if current is served or current.runtime.manifest.input != served.runtime.manifest.input:
                raise
            return await asyncio.wait_for(current.batcher.submit(x), timeout)
    except TimeoutError:
        raise InferenceTimeout(f"no result within {timeout:g}s") from None


ModelQuery = Annotated[str | None, Query(description="NAME or NAME:VERSION; default: the server's default model")]


# ---------------------------------------------------------------- /v1, health, metrics


def _v1_router():
    from fastapi import APIRouter

    r = APIRouter()

    @r.post(
        "/v1/score", tags=["score"], response_model=ScoreResponse, responses=ERRORS, openapi_extra=IMAGE_BODY_DOC,
        dependencies=[Depends(require_api)], summary="Score one or many images",
    )  # fmt: skip
    async def score(request: Request, model: ModelQuery = None) -> Response:
        settings: Settings = request.app.state.settings
        ref = model_ref(model)
        served = served_model(request, ref)
        images = await read_images(request, settings)
        spec = served.runtime.manifest.input
        x = await run_in_threadpool(lambda: to_batch(decode_all(images, settings.max_pixels), spec))
        result = await infer(request, served, x, ref)
        rt = result.runtime  # the version that actually scored (a reload may have swapped it meanwhile)
        body = ScoreResponse(model=rt.name, version=rt.version, provider=rt.provider, results=result.rows)
        return Response(body.model_dump_json().encode(), media_type="application/json")

    @r.post(
        "/v1/canonicalize", tags=["score"], responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "the upright image"}},
        openapi_extra=IMAGE_BODY_DOC, dependencies=[Depends(require_api)], response_class=Response,
        summary="Return the image turned upright and un-mirrored (PNG); its score is in X-Symguard-* headers",
    )  # fmt: skip
    async def canonicalize_image(request: Request, model: ModelQuery = None) -> Response:
        settings: Settings = request.app.state.settings
        ref = model_ref(model)
        served = served_model(request, ref)
        images = await read_images(request, settings)
        if len(images) != 1:
            raise BadRequest(f"canonicalize takes exactly one image, got {len(images)}")
        spec = served.runtime.manifest.input
        decoded = await run_in_threadpool(decode_all, images, settings.max_pixels)
        x = await run_in_threadpool(to_batch, decoded, spec)
        row = (await infer(request, served, x, ref)).rows[0]
        png = await run_in_threadpool(_upright_png, decoded[0], row.angle_deg, row.reflected, spec.background)
        headers = {
            "X-Symguard-Model": row.model, "X-Symguard-Version": str(row.version),
            "X-Symguard-Angle-Deg": f"{row.angle_deg:g}", "X-Symguard-Reflected": str(row.reflected).lower(),
            "X-Symguard-Score": f"{row.score:g}", "X-Symguard-P-Value": f"{row.p_value:g}",
            "X-Symguard-Verdict": row.verdict, "X-Symguard-Reason": row.reason or "none", "X-Symguard-Group": row.group,
        }  # fmt: skip
        return Response(png, media_type="image/png", headers=headers)

    @r.get("/v1/models", tags=["models"], response_model=ModelsResponse, summary="Served models, versions and providers")
    async def list_models(request: Request) -> Response:
        return Response(ModelsResponse(models=_model_infos(registry_of(request))).model_dump_json().encode(), media_type="application/json")

    @r.post(
        "/v1/models/{name}/reload", tags=["models"], response_model=ModelInfo, dependencies=[Depends(require_admin)],
        responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody},
                   409: {"model": ErrorBody, "description": "new version failed verification or self-check; the old one still serves"}},
        summary="Load the newest (or ?version=) version beside the old one, self-check it, then swap (admin)",
    )  # fmt: skip
    async def reload(request: Request, name: str, version: Annotated[int | None, Query(ge=1)] = None) -> Response:
        reg = registry_of(request)
        await reg.load(name, version)
        info = next(m for m in _model_infos(reg) if m.name == name)
        return Response(info.model_dump_json().encode(), media_type="application/json")

    @r.get("/healthz", tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @r.get("/readyz", tags=["health"], response_model=ReadyResponse, summary="Readiness: a model is loaded and passed its self-check")
    async def readyz(request: Request) -> Response:
        reg = registry_of(request)
        body = ReadyResponse(
            ready=reg.ready,
            models=[{"name": n, "version": s.runtime.version, "provider": s.runtime.provider} for n, s in sorted(reg.models.items())],
            problems=dict(reg.unavailable),
        )
        return Response(body.model_dump_json().encode(), 200 if reg.ready else 503, media_type="application/json")

    @r.get("/metrics", tags=["health"], response_class=Response, summary="Prometheus metrics")
    async def metrics_endpoint(request: Request) -> Response:
        return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)

    return r


def _upright_png(img: Image.Image, angle_deg: float, reflected: bool, background: float) -> bytes:
    """The decoded (EXIF-applied) original at full resolution, turned back: rotate by -φ, then undo the mirror."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = to_mode(img, 1)  # high bit depth: scaled to 8-bit, as the model saw it
    elif img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "L" if img.mode == "1" else "RGB")
    v = round(background * 255)
    fill: int | tuple[int, ...] = {"L": v, "RGB": (v, v, v), "RGBA": (v, v, v, 0)}[img.mode]
    buf = io.BytesIO()
    canonicalize(img, angle_deg, reflected, fill=fill).save(buf, format="PNG")
    return buf.getvalue()


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
            infos.append(ModelInfo(name=name, state="unavailable", versions_on_disk=reg.repository.versions(name), last_error=why))
    return infos
