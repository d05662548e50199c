"""Bad input gets a typed 4xx with a JSON body that names the problem; never a 500, and the server keeps serving."""

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


def test_garbage_and_unsupported(server):
    with server.client() as c:
        garbage = c.post("/v1/score", content=b"this is not an image at all", headers=PNG)
        text = c.post("/v1/score", content=b"hello", headers={"content-type": "text/plain"})
        none = c.post("/v1/score", content=b"hello", headers={"content-type": ""})
        svg = c.post(
            "/v1/score", content=b"<svg xmlns='http://www.w3.org/2000/svg'/>", headers={"content-type": "image/svg+xml"}
        )
    _err(garbage, 415, "unsupported_media_type")
    assert "supported format" in garbage.json()["error"]
    _err(text, 415, "unsupported_media_type")
    _err(none, 415, "unsupported_media_type")
    _err(svg, 415, "unsupported_media_type")


def test_truncated_image_is_422(server, mnist_digits):
    digits, _ = mnist_digits
    data = png(digits[3])
    with server.client() as c:
        r = c.post("/v1/score", content=data[: len(data) // 2], headers=PNG)
        empty = c.post("/v1/score", content=b"", headers=PNG)
    _err(r, 422, "corrupt_image")
    _err(empty, 422, "corrupt_image")


def test_json_problems_are_422(server):
    with server.client() as c:
        bad_b64 = c.post("/v1/score", json={"images": ["%%%not-base64%%%"]})
        missing = c.post("/v1/score", json={"pictures": []})
        empty = c.post("/v1/score", json={"images": []})
        not_json = c.post("/v1/score", content=b"{nope", headers={"content-type": "application/json"})
        wrong_type = c.post("/v1/score", json={"images": [123]})
    _err(bad_b64, 422, "invalid_base64")
    assert "images[0]" in bad_b64.json()["error"]
    _err(missing, 422, "bad_request")
    assert "images" in missing.json()["error"]
    _err(empty, 422, "bad_request")
    _err(not_json, 422, "bad_request")
    _err(wrong_type, 422, "bad_request")


def test_multipart_without_a_file_is_422(server):
    only_a_field = b'--x\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file here\r\n--x--\r\n'
    with server.client() as c:
        r = c.post("/v1/score", content=only_a_field, headers={"content-type": "multipart/form-data; boundary=x"})
        broken = c.post(
            "/v1/score", content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=x"}
        )
    _err(r, 422, "no_image")
    assert broken.status_code == 422 and broken.json()["error"]


def test_unknown_route_and_method_are_json(server):
    with server.client() as c:
        nf = c.get("/v1/nothing")
        method = c.get("/v1/score")
    assert nf.status_code == 404 and nf.json()["code"] == "http_404"
    assert method.status_code == 405 and "error" in method.json()


def test_server_still_serves_after_bad_input(server, mnist_digits):
    digits, _ = mnist_digits
    with server.client() as c:
        for _ in range(3):
            c.post("/v1/score", content=b"\x89PNG\r\n\x1a\n garbage", headers=PNG)
        ok = c.post("/v1/score", content=png(digits[0]), headers=PNG)
        metrics = c.get("/metrics").text
    assert ok.status_code == 200
    assert 'code="500"' not in metrics
