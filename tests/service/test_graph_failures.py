"""Graphs that load but cannot serve: refused at load with the reason, or, if one fails only while serving, every
request still gets a JSON answer and the batcher keeps its workers. Real ONNX Runtime on edited real graphs."""

from __future__ import annotations

import base64
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _support import LiveServer, batch_bound_graph, copy_version, fixed_batch_graph, png, rehash

from service.manifest import Manifest

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def repo(bundle_repo, tmp_path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(bundle_repo, dst)
    return dst


def _probe_count(bundle: Path) -> int:
    return len(Manifest.load(bundle).probes)


def test_a_fixed_batch_axis_is_refused_at_reload(repo):
    bad = copy_version(repo, "digits", 1, 2)
    fixed_batch_graph(bad / "model.onnx", batch=1)
    rehash(bad)
    with LiveServer(repository=repo, model="digits:1", admin_token=TOKEN) as s, s.client() as c:
        r = c.post("/v1/models/digits/reload", params={"version": 2}, headers=AUTH)
        serving = c.get("/v1/models").json()["models"][0]["version"]
    assert r.status_code == 409 and r.json()["code"] == "bundle_error"
    assert "fixed batch size of 1" in r.json()["error"] and "dynamic batch axis" in r.json()["error"]
    assert serving == 1


def test_a_graph_that_fails_on_the_probes_never_becomes_ready(repo, mnist_digits):
    only = repo / "digits" / "1"
    batch_bound_graph(only / "model.onnx", rows=_probe_count(only) + 1)  # the probes' batch cannot run
    rehash(only)
    with LiveServer(repository=repo) as s, s.client() as c:
        ready = c.get("/readyz")
        score = c.post("/v1/score", content=png(mnist_digits[0][0]), headers={"content-type": "image/png"})
    assert ready.status_code == 503
    assert "the graph fails on the probes" in ready.json()["problems"]["digits"]
    assert score.status_code == 503 and score.json()["code"] == "model_not_ready"


def test_inference_failures_answer_every_request_and_release_the_workers(repo, mnist_digits):
    """This graph passes the self-check (it runs only on batches of the probes' size) and fails on any other batch
    while serving. More failing batches than the server has inference workers must all be answered, at once, with
    the reason; a leaked worker slot would leave the later ones waiting for the timeout."""
    only = repo / "digits" / "1"
    probes = _probe_count(only)
    batch_bound_graph(only / "model.onnx", rows=probes)
    rehash(only)
    # each request's batch, whole or split over the 2 workers, is larger than the probes' batch: it fails
    images = [base64.b64encode(png(d)).decode() for d in mnist_digits[0][: 2 * probes + 2]]
    with LiveServer(repository=repo, request_timeout_s=5.0) as s, s.client() as c:
        assert c.get("/readyz").status_code == 200

        def score(_: int):
            return c.post("/v1/score", json={"images": images})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(score, range(12)))
        ready = c.get("/readyz")
        metrics = c.get("/metrics").text
    assert [r.status_code for r in answers] == [500] * 12
    for r in answers:
        assert r.json()["code"] == "inference_failed" and "inference failed" in r.json()["error"]
    assert all(r.elapsed.total_seconds() < 5.0 for r in answers)  # none waited for a worker that never came back
    assert ready.status_code == 200  # one bad batch does not take the model out of service
    assert 'symguard_requests_total{code="500",endpoint="/v1/score"} 12.0' in metrics  # counted, as errors
