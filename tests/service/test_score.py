"""/v1/score and /v1/canonicalize over real HTTP, with real MNIST digits and the real ONNX graph."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from _support import angle_diff, moved_png, pad29, png
from PIL import Image, ImageOps

from service.geometry import D4, canonicalize, compose

ROW_KEYS = {"angle_deg", "reflected", "reflected_probability", "rotation_level_deg", "reflection_level", "score",
            "p_value", "verdict", "reason", "group", "class_name", "model", "version"}  # fmt: skip


def test_multipart_raw_and_json_give_the_same_rows(server, mnist_digits):
    digits, _ = mnist_digits
    files = [png(digits[i]) for i in (0, 1000, 2000)]
    with server.client() as c:
        multi = c.post("/v1/score", files=[("file", (f"{i}.png", f, "image/png")) for i, f in enumerate(files)])
        raw = c.post("/v1/score", content=files[1], headers={"content-type": "image/png"})
        js = c.post("/v1/score", json={"images": [base64.b64encode(f).decode() for f in files]})
    assert multi.status_code == raw.status_code == js.status_code == 200, (multi.text, raw.text, js.text)
    body = multi.json()
    assert body["model"] == "digits" and body["version"] == 1 and body["provider"] == "CPUExecutionProvider"
    rows = body["results"]
    assert len(rows) == 3 and ROW_KEYS <= set(rows[0])
    assert all(r["verdict"] in ("in", "ood") and 0 < r["p_value"] <= 1 for r in rows)
    assert js.json()["results"] == rows
    assert raw.json()["results"][0] == rows[1]
    assert len({r["angle_deg"] for r in rows}) == 3  # three different digits, three different poses


@pytest.mark.parametrize("k,mirrored", D4[1:])
def test_served_pose_moves_with_the_image(server, mnist_digits, k, mirrored):
    """Rotating/mirroring the file by g moves the reported pose by g: ψ(g·x) = g·ψ(x), end to end through PNG decode."""
    digits, _ = mnist_digits
    picks = [5, 1505, 3005]
    with server.client() as c:
        base = c.post("/v1/score", files=[("f", moved_png(digits[i], 0, False)) for i in picks]).json()["results"]
        moved = c.post("/v1/score", files=[("f", moved_png(digits[i], k, mirrored)) for i in picks]).json()["results"]
    for b, m in zip(base, moved):
        expect_angle, expect_reflected = compose((90.0 * k, mirrored), (b["angle_deg"], b["reflected"]))
        assert angle_diff(m["angle_deg"], expect_angle) < 0.01
        assert m["reflected"] == expect_reflected
        assert m["rotation_level_deg"] == pytest.approx(b["rotation_level_deg"], abs=1e-2)
        assert m["class_name"] == b["class_name"]


def test_exif_orientation_is_applied_before_scoring(server, mnist_digits):
    digits, _ = mnist_digits
    arr = pad29(digits[42])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    tagged = png(arr, exif=exif.tobytes())
    as_viewed = png(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged)))))
    with server.client() as c:
        r_tagged, r_viewed, r_raw = (
            c.post("/v1/score", content=b, headers={"content-type": "image/png"}).json()["results"][0]
            for b in (tagged, as_viewed, png(arr))
        )
    assert r_tagged == r_viewed
    assert angle_diff(r_tagged["angle_deg"], r_raw["angle_deg"]) > 1.0  # the tag really changed what was scored


def test_canonicalize_returns_the_upright_image_with_score_headers(server, mnist_digits):
    digits, _ = mnist_digits
    img = moved_png(digits[7], 1, True)
    with server.client() as c:
        r = c.post("/v1/canonicalize", content=img, headers={"content-type": "image/png"})
        score = c.post("/v1/score", content=img, headers={"content-type": "image/png"}).json()["results"][0]
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert float(r.headers["x-symguard-angle-deg"]) == pytest.approx(score["angle_deg"], abs=1e-3)
    assert r.headers["x-symguard-reflected"] == str(score["reflected"]).lower()
    assert r.headers["x-symguard-verdict"] == score["verdict"] and r.headers["x-symguard-model"] == "digits"
    out = np.asarray(Image.open(io.BytesIO(r.content)))
    # exactly geometry.canonicalize of the decoded original with the scored pose: rotate back, then un-mirror
    expect = canonicalize(Image.open(io.BytesIO(img)), score["angle_deg"], score["reflected"])
    assert out.shape == (29, 29) and np.array_equal(out, np.asarray(expect))
    assert not np.array_equal(out, np.asarray(Image.open(io.BytesIO(img))))


def test_canonicalize_takes_exactly_one_image(server, mnist_digits):
    digits, _ = mnist_digits
    with server.client() as c:
        r = c.post("/v1/canonicalize", files=[("f", png(digits[0])), ("f", png(digits[1]))])
    assert r.status_code == 422 and "exactly one" in r.json()["error"]


def test_model_query_selects_and_rejects(server, mnist_digits):
    digits, _ = mnist_digits
    with server.client() as c:
        ok = c.post(
            "/v1/score", params={"model": "digits:1"}, content=png(digits[0]), headers={"content-type": "image/png"}
        )
        unknown = c.post(
            "/v1/score", params={"model": "nope"}, content=png(digits[0]), headers={"content-type": "image/png"}
        )
        bad_version = c.post(
            "/v1/score", params={"model": "digits:7"}, content=png(digits[0]), headers={"content-type": "image/png"}
        )
        bad_ref = c.post(
            "/v1/score", params={"model": "../etc"}, content=png(digits[0]), headers={"content-type": "image/png"}
        )
    assert ok.status_code == 200 and ok.json()["version"] == 1
    assert unknown.status_code == 404 and unknown.json()["code"] == "model_not_found"
    assert bad_version.status_code == 404 and "version 7" in bad_version.json()["error"]
    assert bad_ref.status_code == 404


def test_models_health_ready_docs(server):
    with server.client() as c:
        models = c.get("/v1/models").json()["models"]
        ready = c.get("/readyz")
        live = c.get("/healthz")
        docs = c.get("/docs")
        spec = c.get("/openapi.json").json()
    assert [m["name"] for m in models] == ["digits"]
    m = models[0]
    assert m["state"] == "serving" and m["provider"] == "CPUExecutionProvider" and m["default"] is True
    assert m["self_check"]["passed"] and max(m["self_check"]["equivariance_error"].values()) < 1e-3
    assert ready.status_code == 200 and ready.json()["models"][0]["provider"] == "CPUExecutionProvider"
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    for path in ("/v1/score", "/v1/canonicalize", "/v1/models", "/v1/models/{name}/reload", "/readyz", "/healthz", "/metrics",
                 "/v2/models/{name}/infer", "/v2/health/ready"):  # fmt: skip
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]


def test_admin_routes_are_off_without_a_token(server):
    with server.client() as c:
        r = c.post("/v1/models/digits/reload", headers={"authorization": "Bearer anything"})
    assert r.status_code == 403 and r.json()["code"] == "admin_disabled"


def test_scoring_token_when_configured(bundle_repo, mnist_digits):
    from _support import LiveServer

    digits, _ = mnist_digits
    body = dict(content=png(digits[0]), headers={"content-type": "image/png"})
    with LiveServer(repository=bundle_repo, api_token="score-me") as s, s.client() as c:
        missing = c.post("/v1/score", **body)
        wrong = c.post(
            "/v1/score", content=body["content"], headers={**body["headers"], "authorization": "Bearer nope"}
        )
        right = c.post(
            "/v1/score", content=body["content"], headers={**body["headers"], "authorization": "Bearer score-me"}
        )
        health = c.get("/healthz")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert right.status_code == 200 and health.status_code == 200
