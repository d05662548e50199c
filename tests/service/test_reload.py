"""Model repository and reloads: verified, self-checked beside the old version, swapped atomically; failures keep
the old version serving, say why, and bump symguard_reload_failures_total."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _support import LiveServer, copy_version, non_equivariant_graph, png, rehash

from service.manifest import Manifest, Probe

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def repo(bundle_repo, tmp_path_factory) -> Path:
    """A private copy of the repository: these tests add versions to it."""
    dst = tmp_path_factory.mktemp("reload") / "repo"
    shutil.copytree(bundle_repo, dst)
    return dst


@pytest.fixture(scope="module")
def admin(repo) -> Iterator[LiveServer]:
    with LiveServer(repository=repo, admin_token=TOKEN) as s:
        yield s


def _failures(metrics: str) -> float:
    m = re.search(r'symguard_reload_failures_total{model="digits"} (\S+)', metrics)
    return float(m.group(1)) if m else 0.0


def _serving(c) -> int:
    return c.get("/v1/models").json()["models"][0]["version"]


def test_reload_requires_the_admin_token(admin):
    with admin.client() as c:
        missing = c.post("/v1/models/digits/reload")
        wrong = c.post("/v1/models/digits/reload", headers={"authorization": "Bearer admin-secreT"})
        unknown = c.post("/v1/models/nope/reload", headers=AUTH)
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    assert wrong.status_code == 401
    assert unknown.status_code == 404 and unknown.json()["code"] == "model_not_found"


def test_good_reload_swaps_to_the_new_version(admin, repo, mnist_digits):
    digits, _ = mnist_digits
    copy_version(repo, "digits", 1, 2)
    with admin.client() as c:
        assert _serving(c) == 1
        r = c.post("/v1/models/digits/reload", headers=AUTH)
        scored = c.post("/v1/score", content=png(digits[0]), headers={"content-type": "image/png"}).json()
        metrics = c.get("/metrics").text
        ready = c.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2 and r.json()["versions_on_disk"] == [1, 2]
    assert scored["version"] == 2 and scored["results"][0]["version"] == 2
    assert 'symguard_model_info{model="digits",provider="CPUExecutionProvider",version="2"} 1.0' in metrics
    assert 'version="1"' not in metrics.split("symguard_model_info")[1].split("# HELP")[0]
    assert ready.status_code == 200


def test_corrupt_onnx_keeps_the_old_version(admin, repo):
    bad = copy_version(repo, "digits", 2, 3)
    (bad / "model.onnx").write_bytes(b"\x08\x07 definitely not a protobuf graph" * 50)
    rehash(bad)  # the sha256 matches: it is ONNX Runtime that must refuse it
    with admin.client() as c:
        before = _failures(c.get("/metrics").text)
        r = c.post("/v1/models/digits/reload", headers=AUTH)
        after = _failures(c.get("/metrics").text)
        models = c.get("/v1/models").json()["models"]
        ready = c.get("/readyz")
    assert r.status_code == 409 and r.json()["code"] == "bundle_error"
    assert "ONNX Runtime" in r.json()["error"]
    assert models[0]["version"] == 2 and "ONNX Runtime" in models[0]["last_error"]
    assert after == before + 1
    assert ready.status_code == 200  # the old version still serves


def test_sha_mismatch_keeps_the_old_version(admin, repo):
    shutil.rmtree(repo / "digits" / "3")
    bad = copy_version(repo, "digits", 2, 4)
    with open(bad / "model.onnx", "r+b") as f:  # flip one byte somewhere in the weights
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with admin.client() as c:
        before = _failures(c.get("/metrics").text)
        r = c.post("/v1/models/digits/reload", headers=AUTH)
        after = _failures(c.get("/metrics").text)
        serving = _serving(c)
    assert r.status_code == 409 and r.json()["code"] == "integrity_error"
    assert "sha256" in r.json()["error"]
    assert serving == 2 and after == before + 1


def test_self_check_refuses_a_non_equivariant_graph(admin, repo):
    shutil.rmtree(repo / "digits" / "4")
    bad = copy_version(repo, "digits", 2, 5)
    non_equivariant_graph(bad / "model.onnx")
    _probes_from_graph(bad)  # stored probe outputs agree with this graph: only equivariance can fail
    rehash(bad)
    with admin.client() as c:
        r = c.post("/v1/models/digits/reload", headers=AUTH)
        serving = _serving(c)
    assert r.status_code == 409 and r.json()["code"] == "self_check_failed"
    assert "equivariance error" in r.json()["error"] and "probe" not in r.json()["error"]
    assert r.json()["equivariance_error"]["rot90"] > 1e-3
    assert serving == 2


def test_self_check_refuses_probe_disagreement(admin, repo):
    shutil.rmtree(repo / "digits" / "5")
    bad = copy_version(repo, "digits", 2, 6)
    m = Manifest.load(bad)
    probes = [p.model_copy(update={"angle_deg": p.angle_deg + 30.0}) for p in m.probes]
    m.model_copy(update={"probes": probes}).write(bad)
    with admin.client() as c:
        r = c.post("/v1/models/digits/reload", headers=AUTH)
        pinned_back = c.post("/v1/models/digits/reload", params={"version": 1}, headers=AUTH)
    assert r.status_code == 409 and "probe angles" in r.json()["error"]
    assert pinned_back.status_code == 200 and pinned_back.json()["version"] == 1


def test_reloads_under_load_drop_no_request(admin, mnist_digits):
    """Swap versions back and forth while clients keep scoring: every request is answered 200 by some version."""
    import threading

    import httpx

    digits, _ = mnist_digits
    body = png(digits[0])
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=admin.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/score", content=body, headers={"content-type": "image/png"})
                seen.append((r.status_code, r.json().get("version", -1)))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with admin.client() as c:
            swaps = [
                c.post("/v1/models/digits/reload", params={"version": v}, headers=AUTH).status_code
                for v in (2, 1, 2, 1)
            ]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert swaps == [200] * 4
    assert seen and {code for code, _ in seen} == {200}, set(seen)
    assert {v for _, v in seen} <= {1, 2}


def test_startup_self_check_failure_keeps_the_server_unready(repo, tmp_path, mnist_digits):
    digits, _ = mnist_digits
    only_bad = tmp_path / "repo"
    shutil.copytree(repo / "digits" / "6", only_bad / "digits" / "6")
    with LiveServer(repository=only_bad) as s, s.client() as c:
        live = c.get("/healthz")
        ready = c.get("/readyz")
        v2ready = c.get("/v2/health/ready")
        score = c.post("/v1/score", content=png(digits[0]), headers={"content-type": "image/png"})
        models = c.get("/v1/models").json()["models"]
    assert live.status_code == 200
    assert ready.status_code == 503 and "probe angles" in ready.json()["problems"]["digits"]
    assert v2ready.status_code == 503
    assert score.status_code == 503 and score.json()["code"] == "model_not_ready"
    assert models == [{**models[0], "name": "digits", "state": "unavailable"}]


def test_pin_to_a_missing_version_is_live_but_not_ready(repo):
    with LiveServer(repository=repo, model="digits:99") as s, s.client() as c:
        ready = c.get("/readyz")
    assert ready.status_code == 503 and "no version 99" in ready.json()["problems"]["digits"]


def test_empty_repository_is_live_but_not_ready(tmp_path):
    with LiveServer(repository=tmp_path / "nothing-here") as s, s.client() as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False


def test_pinned_version_is_served(repo):
    with LiveServer(repository=repo, model="digits:1") as s, s.client() as c:
        models = c.get("/v1/models").json()["models"]
        other = c.post("/v1/score", params={"model": "digits:2"}, content=b"x", headers={"content-type": "image/png"})
    assert [(m["name"], m["version"]) for m in models] == [("digits", 1)]
    assert other.status_code == 404


def _probes_from_graph(bundle: Path) -> None:
    import base64
    import io

    import onnxruntime as ort
    from PIL import Image

    m = Manifest.load(bundle)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    probes = []
    for p in m.probes:
        x = np.asarray(Image.open(io.BytesIO(base64.b64decode(p.png_base64))), np.float32)[None, None] / 255.0
        pose, logit = sess.run(["pose", "reflection_logit"], {"image": x})
        angle = float(np.degrees(np.arctan2(pose[0, 1], pose[0, 0])))
        probes.append(Probe(png_base64=p.png_base64, angle_deg=angle, reflection_logit=float(logit[0])))
    m.model_copy(update={"probes": probes}).write(bundle)
