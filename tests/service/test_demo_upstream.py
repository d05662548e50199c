"""The demo upstream (service/demo/upstream.py) as users run it: a real process on 127.0.0.1, real test digits."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from _support import huge_png_header, pad29, png
from PIL import Image

from service.demo import DEMO_DIR
from service.manifest import sha256_file


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.demo.upstream", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"upstream exited with {proc.returncode}: {proc.stdout.read().decode()}")  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("upstream never became live")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.fixture(scope="module")
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    """The held-out test split (never trained on), as the original uint8 28x28 digits."""
    from models.demo_classifier import upright_digits

    _, _, (x, y) = upright_digits()
    return (x[:, 0].numpy() * 255).round().astype(np.uint8), y.numpy()


def _predict(client: httpx.Client, **request: object) -> dict:
    r = client.post("/predict", **request)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return r.json()


def test_shipped_graph_is_small_and_matches_its_json():
    meta = json.loads((DEMO_DIR / "classifier.json").read_text())
    graph = DEMO_DIR / meta["file"]
    assert graph.stat().st_size < 1_000_000
    assert sha256_file(graph) == meta["sha256"]
    assert meta["input"]["size"] == 28 and meta["classes"] == [str(c) for c in range(10)]
    assert meta["test_accuracy"] >= 0.97


def test_upright_test_digits_are_classified(upstream, test_digits):
    x, y = test_digits
    idx = np.random.default_rng(0).choice(len(x), 200, replace=False)
    with httpx.Client(base_url=upstream, timeout=30) as c:
        predicted = [_predict(c, content=png(x[i]), headers={"content-type": "image/png"})["class"] for i in idx]
    accuracy = np.mean([p == str(y[i]) for p, i in zip(predicted, idx)])
    assert accuracy >= 0.95, accuracy


def test_three_body_encodings_agree(upstream, test_digits):
    x, _ = test_digits
    with httpx.Client(base_url=upstream, timeout=30) as c:
        for digit in x[:8]:
            data = png(digit)
            raw = _predict(c, content=data, headers={"content-type": "image/png"})
            multipart = _predict(c, files={"image": ("digit.png", data, "image/png")})
            as_json = _predict(c, json={"image": base64.b64encode(data).decode()})
            assert raw == multipart == as_json
            assert len(raw["probabilities"]) == 10 and abs(sum(raw["probabilities"]) - 1) < 1e-3
            assert raw["class"] == str(int(np.argmax(raw["probabilities"])))


def test_symguard_padding_and_large_images_are_handled(upstream, test_digits):
    """29x29 (symguard's padded size) is cropped back exactly; a 10x upscaled digit is shrunk to fit."""
    x, _ = test_digits
    with httpx.Client(base_url=upstream, timeout=30) as c:
        for digit in x[:5]:
            ref = _predict(c, content=png(digit), headers={"content-type": "image/png"})
            padded = _predict(c, content=png(pad29(digit)), headers={"content-type": "image/png"})
            assert padded["probabilities"] == ref["probabilities"]
            big = Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            big.convert("RGB").save(buf, format="JPEG", quality=95)
            assert _predict(c, content=buf.getvalue(), headers={"content-type": "image/jpeg"})["class"] == ref["class"]


def test_symguard_headers_are_echoed(upstream, test_digits):
    x, _ = test_digits
    with httpx.Client(base_url=upstream, timeout=30) as c:
        body = _predict(
            c, content=png(x[0]),
            headers={"content-type": "image/png", "x-symguard-verdict": "in", "X-Symguard-Angle-Deg": "12.5", "X-Other": "no"},
        )  # fmt: skip
    assert body["headers_seen"] == {"X-Symguard-Verdict": "in", "X-Symguard-Angle-Deg": "12.5"}


@pytest.mark.parametrize(
    ("request_kw", "status"),
    [
        ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 415),
        ({"content": png(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))[:-40], "headers": {"content-type": "image/png"}}, 422),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 422),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"hello"}, 415),
        ({"json": {"picture": "AAAA"}}, 422),
        ({"json": {"image": "***not base64***"}}, 422),
        ({"json": ["image"]}, 422),
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 422),
        ({"files": {"file": ("a.png", b"x", "image/png")}}, 422),
        ({"content": huge_png_header(50_000, 50_000), "headers": {"content-type": "image/png"}}, 413),
        ({"content": b"\0" * (9 * 1024 * 1024), "headers": {"content-type": "image/png"}}, 413),
    ],
)
def test_bad_input_is_a_4xx_json(upstream, request_kw, status):
    r = httpx.post(upstream + "/predict", timeout=30, **request_kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and r.json()["error"]


def test_unknown_routes_are_json(upstream):
    assert httpx.get(upstream + "/predict").status_code == 405
    r = httpx.get(upstream + "/nope")
    assert r.status_code == 404 and r.json()["code"] == "http_404"
