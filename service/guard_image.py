"""Find the one image a proxied request carries, and put a replacement back (canonicalize mode).

Pure body handling, no HTTP and no scoring: (body bytes, Content-Type, ImageLocation) -> Located | None.
"No image here" (another content type, the field or pointer absent) is None, so the request is forwarded untouched.
A body of the right type that cannot be parsed, or a pointer at something that is not base64, raises a typed
4xx error: whether that blocks the request is the caller's decision (it depends on the mode).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.decode import IMAGE_MEDIA_TYPES, decode_base64, media_type
from service.errors import BadRequest, InvalidBase64
from service.guard_config import ImageLocation


def may_hold_image(content_type: str | None, loc: ImageLocation) -> bool:
    """From the Content-Type alone: could this request carry the image? If not, its body is streamed unread."""
    kind = media_type(content_type)
    if loc.kind == "raw":
        return kind in IMAGE_MEDIA_TYPES or kind.startswith("image/")
    if loc.kind == "multipart":
        return kind == "multipart/form-data"
    return kind == "application/json" or kind.endswith("+json")


@dataclass
class _Part:
    name: str
    value: bytes
    filename: str | None = None  # None: a plain form field
    content_type: str | None = None


@dataclass
class Located:
    """The image's bytes, and what is needed to rebuild the body around a replacement."""

    data: bytes
    label: str  # names the image in error messages
    loc: ImageLocation
    _parts: list[_Part] = field(default_factory=list)  # multipart: every part, in order
    _index: int = -1  # multipart: which part is the image
    _doc: Any = None  # json: the parsed document
    _data_url: bool = False  # json: the string was a data: URL, so the replacement is one too

    def replaced(self, png: bytes) -> tuple[bytes, str]:
        """The body with the image swapped for `png`, and its new Content-Type."""
        if self.loc.kind == "raw":
            return png, "image/png"
        if self.loc.kind == "multipart":
            parts = list(self._parts)
            old = parts[self._index]
            stem = (old.filename or "image").rsplit(".", 1)[0]
            parts[self._index] = _Part(old.name, png, f"{stem}.png", "image/png")
            return _encode_multipart(parts)
        text = base64.b64encode(png).decode()
        doc = _set(self._doc, self.loc.pointer, f"data:image/png;base64,{text}" if self._data_url else text)
        return orjson.dumps(doc), "application/json"


async def locate(body: bytes, content_type: str | None, loc: ImageLocation) -> Located | None:
    if not may_hold_image(content_type, loc) or not body:
        return None
    if loc.kind == "raw":
        return Located(body, "body", loc)
    if loc.kind == "multipart":
        return await _locate_multipart(body, content_type or "", loc)
    return _locate_json(body, loc)


# ---------------------------------------------------------------- multipart


async def _locate_multipart(body: bytes, content_type: str, loc: ImageLocation) -> Located | None:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart body: {e.message}") from None
    try:
        parts: list[_Part] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append(_Part(name, await value.read(), value.filename or "", value.content_type))
            else:
                parts.append(_Part(name, value.encode()))
    finally:
        await form.close()
    # the first *file* under the field; a plain text field of that name is not an image
    index = next((i for i, p in enumerate(parts) if p.name == loc.field and p.filename is not None), -1)
    if index < 0:
        return None
    return Located(parts[index].value, f"multipart field {loc.field!r}", loc, _parts=parts, _index=index)


def _quote(s: str) -> str:
    # what browsers do for form-data names and filenames (WHATWG): percent-encode the three breaking characters
    return s.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _encode_multipart(parts: list[_Part]) -> tuple[bytes, str]:
    boundary = f"symguard-{uuid.uuid4().hex}"
    out: list[bytes] = []
    for p in parts:
        disposition = f'form-data; name="{_quote(p.name)}"'
        head = [f"--{boundary}"]
        if p.filename is not None:
            disposition += f'; filename="{_quote(p.filename)}"'
            ctype = p.content_type or "application/octet-stream"
            head += [f"Content-Disposition: {disposition}", f"Content-Type: {ctype}"]
        else:
            head += [f"Content-Disposition: {disposition}"]
        out.append(("\r\n".join(head) + "\r\n\r\n").encode() + p.value + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


# ---------------------------------------------------------------- JSON


_ABSENT = object()


def _locate_json(body: bytes, loc: ImageLocation) -> Located | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    where = "/" + "/".join(loc.pointer)
    value = _get(doc, loc.pointer)
    if value is _ABSENT:
        return None
    if not isinstance(value, str):
        raise InvalidBase64(f"JSON {where} must be a base64 string, not {type(value).__name__}")
    return Located(decode_base64(value, f"JSON {where}"), f"JSON {where}", loc, _doc=doc,
                   _data_url=value.startswith("data:"))  # fmt: skip


def _step(node: Any, token: str) -> tuple[Any, Any]:
    """(container key, child) for one pointer token, or (None, _ABSENT)."""
    if isinstance(node, dict):
        return token, node.get(token, _ABSENT)
    if isinstance(node, list) and token.isdigit() and (token == "0" or not token.startswith("0")):
        i = int(token)
        return i, node[i] if i < len(node) else _ABSENT
    return None, _ABSENT


def _get(doc: Any, pointer: tuple[str, ...]) -> Any:
    node = doc
    for token in pointer:
        _, node = _step(node, token)
        if node is _ABSENT:
            return _ABSENT
    return node


def _set(doc: Any, pointer: tuple[str, ...], value: Any) -> Any:
    """A copy of doc with the (existing) pointer target replaced; only the nodes on the path are copied."""
    if not pointer:
        return value
    key, child = _step(doc, pointer[0])
    new = dict(doc) if isinstance(doc, dict) else list(doc)
    new[key] = _set(child, pointer[1:], value)
    return new
