"""KServe V2 / Open Inference Protocol over real HTTP: metadata, readiness, FP32 and BYTES inference."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from _support import angle_diff, pad29, png


def test_server_and_model_health(server):
    with server.client() as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2").json()["name"] == "symguard"
        ready = c.get("/v2/models/digits/ready")
        ready_v = c.get("/v2/models/digits/versions/1/ready")
        missing = c.get("/v2/models/nope/ready")
        wrong_version = c.get("/v2/models/digits/versions/9/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready_v.status_code == 200
    assert missing.status_code == 404 and missing.json()["error"]
    assert wrong_version.status_code == 404


def test_model_metadata(server):
    with server.client() as c:
        meta = c.get("/v2/models/digits").json()
    assert meta["name"] == "digits" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 29, 29]}]
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes["pose"] == [-1, 2] and shapes["reflection_logit"] == [-1] and shapes["level"] == [-1, 2]
    assert shapes["class_logits"] == [-1, 10]


def test_fp32_infer_matches_v1_score(server, mnist_digits):
    digits, _ = mnist_digits
    arrs = [pad29(digits[i]) for i in (10, 2010)]
    x = np.stack(arrs)[:, None].astype(np.float32) / 255.0  # manifest: mean 0, std 1
    req = {
        "id": "req-7",
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
    }
    with server.client() as c:
        r = c.post("/v2/models/digits/infer", json=req)
        v1 = c.post("/v1/score", files=[("f", png(a)) for a in arrs]).json()["results"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "digits" and body["model_version"] == "1" and body["id"] == "req-7"
    outs = {o["name"]: o for o in body["outputs"]}
    assert set(outs) == {"pose", "reflection_logit", "embedding", "level", "class_logits", "rotation_score"}
    # the pose-posterior graph's own rotation score is the one /v1/score calibrates against
    assert np.allclose(outs["rotation_score"]["data"], [v["rotation_score"] for v in v1], atol=1e-4)
    assert outs["pose"]["shape"] == [2, 2] and outs["pose"]["datatype"] == "FP32"
    assert outs["embedding"]["shape"][0] == 2 and len(outs["embedding"]["data"]) == 2 * outs["embedding"]["shape"][1]
    pose = np.asarray(outs["pose"]["data"]).reshape(2, 2)
    for i in range(2):
        assert angle_diff(float(np.degrees(np.arctan2(pose[i, 1], pose[i, 0]))), v1[i]["angle_deg"]) < 0.01


def test_bytes_infer_and_output_selection(server, mnist_digits):
    digits, _ = mnist_digits
    b64 = [base64.b64encode(png(digits[i])).decode() for i in (1, 2, 3)]
    req = {
        "inputs": [{"name": "image_bytes", "shape": [3], "datatype": "BYTES", "data": b64}],
        "outputs": [{"name": "level"}],
    }
    with server.client() as c:
        r = c.post("/v2/models/digits/versions/1/infer", json=req)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "level" and out["shape"] == [3, 2]


@pytest.mark.parametrize(
    "tensor,code",
    [
        ({"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}, "invalid_tensor"),
        ({"name": "image", "shape": [1, 1, 29, 29], "datatype": "FP32", "data": [0.0] * 10}, "invalid_tensor"),
        ({"name": "image", "shape": [1, 1, 29, 29], "datatype": "INT8", "data": [0] * 841}, "invalid_tensor"),
        ({"name": "image", "shape": [1, 1, 29, 29], "datatype": "FP32", "data": ["a"] * 841}, "invalid_tensor"),
        ({"name": "image", "shape": [1], "datatype": "BYTES", "data": ["!!notbase64!!"]}, "invalid_base64"),
        ({"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGVsbG8="]}, "invalid_tensor"),
        ({"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}, "unsupported_media_type"),
    ],
)
def test_bad_infer_requests_are_4xx_json(server, tensor, code):
    with server.client() as c:
        r = c.post("/v2/models/digits/infer", json={"inputs": [tensor]})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["code"] == code and r.json()["error"]


def test_infer_unknown_model_and_malformed_body(server):
    with server.client() as c:
        unknown = c.post("/v2/models/nope/infer", json={"inputs": []})
        malformed = c.post("/v2/models/digits/infer", json={"inputs": "x"})
        bad_output = c.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [{"name": "i", "shape": [1, 1, 29, 29], "datatype": "FP32", "data": [0.0] * 841}],
                "outputs": [{"name": "nah"}],
            },
        )
    assert unknown.status_code == 404
    assert malformed.status_code == 422 and "inputs" in malformed.json()["error"]
    assert bad_output.status_code == 422 and "nah" in bad_output.json()["error"]
