"""Bytes -> Pillow image, defensively: known formats only, pixel count checked before decoding, EXIF applied.

EXIF policy: a camera that stores "rotate 90° when displaying" in the EXIF Orientation tag shows the picture
upright to people. We apply ImageOps.exif_transpose first, so the angle symguard reports is the one a viewer sees,
and /v1/canonicalize returns pixels that need no EXIF tag. A client that wants the raw sensor orientation scored
must strip the tag before sending.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import CorruptImage, InvalidBase64, TooManyPixels, UnsupportedMediaType

# Decoders we accept. Pillow can do more (EPS shells out to Ghostscript, for one); untrusted bytes get these only.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
IMAGE_MEDIA_TYPES = {
    "image/png", "image/jpeg", "image/jpg", "image/gif", "image/bmp", "image/x-ms-bmp", "image/tiff", "image/webp",
    "image/x-portable-pixmap", "image/x-portable-graymap", "image/x-portable-anymap", "application/octet-stream",
}  # fmt: skip
# How files of the accepted formats begin. Bytes that start like one of them but that Pillow cannot open are a
# damaged or truncated file of that format (422 corrupt_image), not an unsupported format (415).
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)  # fmt: skip


def sniff(data: bytes) -> str | None:
    """The accepted format these bytes claim to be by their first bytes, or None (BMP's and PPM's are too weak)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for sig, fmt in SIGNATURES if data.startswith(sig)), None)


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode one image; raises typed errors that name `what` (e.g. "images[2]")."""
    return finish_image(open_image(data, max_pixels, what), data, what)


def open_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Read only the header (microseconds) and refuse huge canvases before a single pixel is decoded."""
    if not data:
        raise CorruptImage(f"{what} is empty")
    with _decoding(data, what):
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w * h > max_pixels:
            raise TooManyPixels(f"{what} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", width=w, height=h)
        return img


def finish_image(img: Image.Image, data: bytes, what: str = "image") -> Image.Image:
    """Decode the pixels of an opened image (the first frame of an animation) and apply its EXIF orientation."""
    with _decoding(data, what):
        img.load()
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the usual image that needs no turn
    except Exception:  # unreadable EXIF: no viewer can apply its orientation either; the stored pixels are the picture
        pass
    return img


@contextmanager
def _decoding(data: bytes, what: str) -> Iterator[None]:
    """Pillow's zoo of exceptions -> our typed errors."""
    try:
        yield
    except TooManyPixels:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit (2x MAX_IMAGE_PIXELS), a second line behind ours
        raise TooManyPixels(f"{what}: {e}") from None
    except UnidentifiedImageError:
        if fmt := sniff(data):
            raise CorruptImage(f"{what} starts like a {fmt} file but its header is damaged or truncated") from None
        raise UnsupportedMediaType(f"{what} is not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as e:  # truncated or malformed data: Pillow's decoders raise a zoo of types
        raise CorruptImage(f"{what} could not be decoded: {type(e).__name__}: {e}") from None


def decode_base64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidBase64(f"{what} must be a base64 string")
    if text.startswith("data:"):  # tolerate data URLs: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line-wrapped base64 is common
    except (binascii.Error, ValueError):
        raise InvalidBase64(f"{what} is not valid base64") from None


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()
