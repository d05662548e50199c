"""HTTP request -> encoded images (multipart files, a raw image body, or JSON base64) -> model input batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.config import Settings
from service.decode import IMAGE_MEDIA_TYPES, decode_base64, decode_image, finish_image, media_type, open_image
from service.errors import BadRequest, NoImage, TooManyImages, UnsupportedMediaType
from service.manifest import InputSpec
from service.preprocess import normalise_many, prepare
from service.schemas import ScoreJSON


@dataclass(frozen=True)
class Encoded:
    data: bytes
    label: str  # how error messages name it: "images[3]", "file 'a.png'", "body"


async def read_images(request: Request, settings: Settings) -> list[Encoded]:
    kind = media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        images = await _multipart(request, settings)
    elif kind == "application/json":
        images = _json(await request.body())
    elif kind in IMAGE_MEDIA_TYPES or kind.startswith("image/"):
        images = [Encoded(await request.body(), "body")]
    elif not kind:
        raise UnsupportedMediaType(
            "missing Content-Type: send multipart/form-data, application/json or an image/* body"
        )
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind!r} is not accepted: send multipart/form-data, application/json or image/*"
        )
    if not images:
        raise NoImage("the request holds no image")
    if len(images) > settings.max_images:
        raise TooManyImages(f"{len(images)} images in one request; the limit is {settings.max_images}")
    return images


async def _multipart(request: Request, settings: Settings) -> list[Encoded]:
    try:
        form = await request.form(max_files=settings.max_images + 1, max_fields=settings.max_images + 16)
    except HTTPException as e:  # Starlette reports multipart problems as 400s; re-type them
        if "Too many files" in str(e.detail):
            raise TooManyImages(f"more than {settings.max_images} files in one request") from None
        raise BadRequest(f"malformed multipart body: {e.detail}") from None
    try:
        files = [(key, v) for key, v in form.multi_items() if isinstance(v, UploadFile)]
        return [Encoded(await f.read(), f"file {f.filename or key!r}") for key, f in files]
    finally:
        await form.close()


def _json(body: bytes) -> list[Encoded]:
    try:
        payload = ScoreJSON.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f'JSON body must be {{"images": ["<base64>", ...]}}: {where}: {first["msg"]}') from None
    return [Encoded(decode_base64(text, f"images[{i}]"), f"images[{i}]") for i, text in enumerate(payload.images)]


# ---- decoding and preprocessing

# A thread hop costs more than decoding a small image (~0.1 ms): single images up to these sizes are decoded on
# the event loop (single 28x28 PNGs: +15-17% images/s at 64 clients, BENCHMARKS.md); anything larger, or many
# images, goes to a worker thread so the loop never blocks for long. The byte bound caps the header parse too.
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 128 * 128


async def decode_batch(
    images: list[Encoded], spec: InputSpec, max_pixels: int
) -> tuple[list[Image.Image], np.ndarray]:
    """Decode and preprocess: the decoded images (EXIF applied) and the model input batch."""
    if len(images) == 1 and len(images[0].data) <= INLINE_MAX_BYTES:
        one = images[0]
        opened = open_image(one.data, max_pixels, one.label)

        def finish() -> tuple[list[Image.Image], np.ndarray]:
            decoded = [finish_image(opened, one.data, one.label)]
            return decoded, to_batch(decoded, spec)

        return finish() if opened.width * opened.height <= INLINE_MAX_PIXELS else await run_in_threadpool(finish)

    def decode() -> tuple[list[Image.Image], np.ndarray]:
        decoded = decode_all(images, max_pixels)
        return decoded, to_batch(decoded, spec)

    return await run_in_threadpool(decode)


# blocking: callers on the event loop use decode_batch, which runs these on a worker thread


def decode_all(images: list[Encoded], max_pixels: int) -> list[Image.Image]:
    return [decode_image(im.data, max_pixels, im.label) for im in images]


def to_batch(images: list[Image.Image], spec: InputSpec) -> np.ndarray:
    prepared = []
    for i, img in enumerate(images):
        try:
            prepared.append(prepare(img, spec))
        except (ValueError, OSError) as e:  # an exotic pixel mode Pillow cannot convert
            raise UnsupportedMediaType(f"image {i} (mode {img.mode}) cannot be converted for the model: {e}") from None
    return normalise_many(prepared, spec)


def prepare_batch(images: list[Encoded], spec: InputSpec, max_pixels: int) -> np.ndarray:
    return to_batch(decode_all(images, max_pixels), spec)
