"""What the /v1 and /v2 routes and the guard share: model lookup, inference through the batcher, scoring and
canonicalizing one image, JSON responses, error docs."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from typing import Any

import orjson
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response

from service.batching import Result
from service.errors import InferenceTimeout, ShuttingDown
from service.geometry import canonicalize
from service.inputs import Encoded, decode_batch
from service.preprocess import to_mode
from service.registry import Registry, Served
from service.repository import ModelRef
from service.schemas import ErrorBody
from service.scoring import ImageScore

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
        async with asyncio.timeout(timeout):  # not wait_for: that wraps each request's wait in a task of its own
            try:
                return await served.batcher.submit(x)
            except ShuttingDown:
                current = registry_of(request).get(ref)
                if current is served or current.runtime.manifest.input != served.runtime.manifest.input:
                    raise
                return await current.batcher.submit(x)
    except TimeoutError:
        raise InferenceTimeout(f"no result within {timeout:g}s") from None


@dataclass(frozen=True)
class Scored:
    """One image's score, with the decoded original kept for canonicalizing it."""

    row: ImageScore
    image: Image.Image  # decoded, EXIF applied, full resolution
    background: float  # the manifest's fill value for corners uncovered by the rotation


async def score_one(request: Request, served: Served, ref: ModelRef | None, image: Encoded) -> Scored:
    """Decode, preprocess and score one image. Decode errors are 4xx; the rest comes from infer()."""
    settings = request.app.state.settings
    spec = served.runtime.manifest.input
    decoded, x = await decode_batch([image], spec, settings.max_pixels)
    row = (await infer(request, served, x, ref)).rows[0]
    return Scored(row, decoded[0], spec.background)


def upright_png(scored: Scored) -> bytes:
    """The decoded original at full resolution, turned back: rotate by -φ, then undo the mirror. Blocking."""
    img = scored.image
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = to_mode(img, 1)  # high bit depth: scaled to 8-bit, as the model saw it
    elif img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert(
            "RGBA" if "A" in img.getbands() or "transparency" in img.info else "L" if img.mode == "1" else "RGB"
        )
    v = round(scored.background * 255)
    fill: int | tuple[int, ...] = {"L": v, "RGB": (v, v, v), "RGBA": (v, v, v, 0)}[img.mode]
    buf = io.BytesIO()
    canonicalize(img, scored.row.angle_deg, scored.row.reflected, fill=fill).save(buf, format="PNG")
    return buf.getvalue()
