"""What the /v1 and /v2 routes share: model lookup, inference through the batcher, JSON responses, error docs."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from service.batching import Result
from service.errors import InferenceTimeout, ShuttingDown
from service.registry import Registry, Served
from service.repository import ModelRef
from service.schemas import ErrorBody

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
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type="application/json"
    )


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
