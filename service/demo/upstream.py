"""The demo upstream: POST /predict classifies one digit image with the demo classifier; GET /healthz.

    python -m service.demo.upstream --host 127.0.0.1 --port 9001

It stands for "your model server": it knows nothing about symguard, except that it echoes any X-Symguard-*
request headers back in `headers_seen`, so the demo shows what the guard annotated.

Request bodies (one image):
  * a raw image body, Content-Type image/png, image/jpeg, ... (or application/octet-stream)
  * multipart/form-data with the file in the field "image"
  * JSON {"image": "<base64>"} (a data: URL is accepted too)
Response: {"class": "7", "probabilities": [10 floats], "headers_seen": {...}}. Bad input is a 4xx JSON
{"error", "code"} (the same typed errors and decoder as symguard itself), never a 500.

Any image size is accepted. The classifier wants 28x28 (MNIST's size), so after grayscale conversion (alpha
flattened onto black, EXIF orientation applied):
  * an image within CROP_SLACK pixels of 28 on both sides (for example symguard's 29x29 padded input, or the
    same-size image /v1/canonicalize and the guard return) is centre-cropped or centre-padded to 28x28 without
    rescaling, with the odd pixel taken from the right/bottom, which exactly undoes symguard's 28 -> 29 padding;
  * anything else is shrunk to fit 28x28 keeping its aspect ratio and centre-padded (symguard's own fit_pad).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.decode import IMAGE_MEDIA_TYPES, decode_base64, decode_image, media_type
from service.demo import DEMO_DIR
from service.errors import BadRequest, NoImage, SymguardError, UnsupportedMediaType, error_response
from service.manifest import sha256_file
from service.middleware import BodyLimit
from service.preprocess import fit_pad, to_mode

CROP_SLACK = 4  # MNIST digits sit inside a 20x20 box with a 4-pixel margin: cropping up to 4 pixels loses no ink
MAX_PIXELS = 4_000_000
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Classifier:
    session: ort.InferenceSession
    classes: list[str]
    size: int
    mean: float
    std: float
    input_name: str
    sha256: str

    @classmethod
    def load(cls, folder: Path = DEMO_DIR, threads: int = 1) -> Classifier:
        """classifier.json + the graph it names; refuses a graph whose sha256 differs from the one recorded."""
        meta = json.loads((folder / "classifier.json").read_text())
        graph = folder / meta["file"]
        digest = sha256_file(graph)
        if digest != meta["sha256"]:
            raise RuntimeError(f"{graph}: sha256 {digest} does not match classifier.json ({meta['sha256']})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        inp = meta["input"]
        return cls(session, meta["classes"], inp["size"], inp["mean"], inp["std"], inp["name"], digest)

    def to_input(self, img: Image.Image) -> np.ndarray:
        """Decoded image (any mode, any size) -> float32 [1, 1, size, size], as described in the module doc."""
        try:
            gray = to_mode(img, 1)
        except (ValueError, OSError) as e:  # an exotic pixel mode Pillow cannot convert
            raise UnsupportedMediaType(f"image mode {img.mode} cannot be converted to grayscale: {e}") from None
        w, h = gray.size
        s = self.size
        if abs(w - s) <= CROP_SLACK and abs(h - s) <= CROP_SLACK:
            # Negative margins pad with black; the odd pixel comes off (or goes on) the right/bottom, like fit_pad.
            left, top = (w - s) // 2, (h - s) // 2
            gray = gray.crop((left, top, left + s, top + s))
        else:
            gray = fit_pad(gray, s)
        arr = np.asarray(gray, dtype=np.float32) / 255.0
        return ((arr - self.mean) / self.std)[None, None].astype(np.float32)

    def predict(self, img: Image.Image) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: self.to_input(img)})[0][0].astype(np.float64)
        e = np.exp(logits - logits.max())
        return e / e.sum()


async def read_one_image(request: Request) -> bytes:
    """The encoded image from a raw body, a multipart field "image", or JSON {"image": base64}."""
    kind = media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=4, max_fields=16)
        except HTTPException as e:
            raise BadRequest(f"malformed multipart body: {e.detail}") from None
        try:
            field = form.get("image")
            if not isinstance(field, UploadFile):
                raise NoImage('multipart body has no file field "image"')
            return await field.read()
        finally:
            await form.close()
    if kind == "application/json":
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(payload, dict) or "image" not in payload:
            raise NoImage('JSON body must be {"image": "<base64>"}')
        return decode_base64(payload["image"], "image")
    if kind in IMAGE_MEDIA_TYPES or kind.startswith("image/"):
        return await request.body()
    raise UnsupportedMediaType(
        f"Content-Type {kind or '(none)'!r} is not accepted: send image/*, multipart/form-data or application/json"
    )


def symguard_headers(request: Request) -> dict[str, str]:
    """X-Symguard-* request headers, names in their usual capitalisation (ASGI hands them over lower-cased)."""
    return {
        "-".join(p.capitalize() for p in k.split("-")): v
        for k, v in request.headers.items()
        if k.lower().startswith("x-symguard-")
    }


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def create_app(classifier: Classifier) -> Starlette:
    async def predict(request: Request) -> Response:
        data = await read_one_image(request)
        img = await run_in_threadpool(decode_image, data, MAX_PIXELS, "image")
        probs = await run_in_threadpool(classifier.predict, img)
        return json_response(
            {
                "class": classifier.classes[int(probs.argmax())],
                "probabilities": [round(float(p), 6) for p in probs],
                "headers_seen": symguard_headers(request),
            }
        )

    async def healthz(_: Request) -> Response:
        return json_response({"status": "ok", "classes": classifier.classes, "sha256": classifier.sha256})

    async def typed(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, SymguardError)
        return error_response(exc)

    async def http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)  # 404 / 405 from routing, as JSON like every other error
        return json_response({"error": str(exc.detail), "code": f"http_{exc.status_code}"}, exc.status_code)

    app = Starlette(
        routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={SymguardError: typed, HTTPException: http},
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.demo.upstream", description="The demo digit classifier over HTTP.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--model-dir", type=Path, default=DEMO_DIR, help="folder holding classifier.json and its .onnx")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    a = p.parse_args(argv)
    app = create_app(Classifier.load(a.model_dir, a.threads))
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False, server_header=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
