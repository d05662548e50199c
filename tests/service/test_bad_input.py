"""Limits and routing: a typed 4xx with a JSON body that names the problem, never a 500.

The hostile-input corpus (hostile_corpus.py, sent by test_hostile.py) covers bad images, media types, JSON, base64,
multipart and slow bodies on every front door; this file keeps the limit checks that need a server with tight limits.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import pytest
from _support import LiveServer, huge_png_header, png

PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def tight(bundle_repo) -> Iterator[LiveServer]:
    """Small limits so the tests can cross them cheaply."""
    with LiveServer(repository=bundle_repo, max_body_bytes=200_000, max_pixels=250_000, max_images=4) as s:
        yield s


def _err(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["code"] == code and r.json()["error"]


def test_body_over_limit_is_413_from_content_length(tight):
    with tight.client() as c:
        r = c.post("/v1/score", content=b"\0" * 300_000, headers=PNG)
        metrics = c.get("/metrics").text
    _err(r, 413, "payload_too_large")
    assert 'symguard_requests_total{code="413",endpoint="/v1/score"}' in metrics  # labelled although never routed


def test_chunked_body_over_limit_is_413_while_streaming(tight):
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\0" * 10_000

    with tight.client() as c:
        r = c.post("/v1/score", content=chunks(), headers=PNG)  # no Content-Length: Transfer-Encoding: chunked
    _err(r, 413, "payload_too_large")


def test_too_many_pixels_is_413_before_decoding(tight):
    with tight.client() as c:
        big = c.post("/v1/score", content=png(np.zeros((600, 600), np.uint8)), headers=PNG)
        bomb = c.post("/v1/score", content=huge_png_header(100_000, 100_000), headers=PNG)
    _err(big, 413, "too_many_pixels")
    assert big.json()["width"] == 600
    _err(bomb, 413, "too_many_pixels")  # 10^10 pixels claimed by a 100-byte file: refused from the header alone


def test_too_many_images_is_413(tight, mnist_digits):
    digits, _ = mnist_digits
    with tight.client() as c:
        r = c.post("/v1/score", files=[("f", png(digits[i])) for i in range(5)])
        r_json = c.post("/v1/score", json={"images": [base64.b64encode(png(digits[0])).decode()] * 5})
    _err(r, 413, "too_many_images")
    _err(r_json, 413, "too_many_images")


def test_unknown_route_and_method_are_json(server):
    with server.client() as c:
        nf = c.get("/v1/nothing")
        method = c.get("/v1/score")
    assert nf.status_code == 404 and nf.json()["code"] == "http_404"
    assert method.status_code == 405 and "error" in method.json()
