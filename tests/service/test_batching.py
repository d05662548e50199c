"""Micro-batching: concurrent callers share session.run calls but each gets back exactly its own rows."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
from _support import LiveServer, angle_diff, hold_request, moved_png

from service.geometry import D4, compose

N_CALLERS = 24


def _histogram(metrics: str, name: str, model: str = "digits") -> tuple[float, float]:
    s = float(re.search(rf'{name}_sum{{model="{model}"}} (\S+)', metrics).group(1))
    n = float(re.search(rf'{name}_count{{model="{model}"}} (\S+)', metrics).group(1))
    return s, n


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_callers_get_their_own_rows(bundle_repo, mnist_digits, workers):
    digits, _ = mnist_digits
    picks = [int(i) for i in range(0, 5000, 5000 // N_CALLERS)][:N_CALLERS]
    moves = [D4[i % 8] for i in range(N_CALLERS)]
    with LiveServer(repository=bundle_repo, max_batch=32, max_delay_ms=50, inference_workers=workers) as s:
        with s.client() as c:  # reference poses, one upright image per caller, sent together
            base = c.post("/v1/score", files=[("f", moved_png(digits[i], 0, False)) for i in picks]).json()["results"]
            before = _histogram(c.get("/metrics").text, "symguard_batch_size")

        answers: list[dict | None] = [None] * N_CALLERS
        start = threading.Barrier(N_CALLERS)

        def call(j: int) -> None:
            k, m = moves[j]
            with httpx.Client(base_url=s.url, timeout=30) as c:
                start.wait()
                r = c.post(
                    "/v1/score", content=moved_png(digits[picks[j]], k, m), headers={"content-type": "image/png"}
                )
                answers[j] = r.json() if r.status_code == 200 else {"status": r.status_code, "body": r.text}

        threads = [threading.Thread(target=call, args=(j,)) for j in range(N_CALLERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with s.client() as c:
            after = _histogram(c.get("/metrics").text, "symguard_batch_size")

    for j, ans in enumerate(answers):
        assert ans is not None and "results" in ans, ans
        (row,) = ans["results"]
        k, m = moves[j]
        expect_angle, expect_reflected = compose((90.0 * k, m), (base[j]["angle_deg"], base[j]["reflected"]))
        assert angle_diff(row["angle_deg"], expect_angle) < 0.01, (j, row["angle_deg"], expect_angle)
        assert row["reflected"] == expect_reflected
        assert row["class_name"] == base[j]["class_name"]
    images, batches = after[0] - before[0], after[1] - before[1]
    assert images == N_CALLERS
    assert batches < N_CALLERS, "no two concurrent requests shared a session.run"


def test_a_lone_batch_is_split_across_idle_workers_and_answered_as_one(bundle_repo, mnist_digits):
    """One 10-image request on an idle server with two workers: two session.runs of 5, one answer whose rows are
    those of each image scored alone, in order."""
    pngs = [moved_png(mnist_digits[0][i], i % 4, i % 3 == 0) for i in range(10)]
    with LiveServer(repository=bundle_repo, inference_workers=2, max_delay_ms=1) as s, s.client() as c:
        alone = [c.post("/v1/score", content=p, headers={"content-type": "image/png"}).json() for p in pngs]
        before = _histogram(c.get("/metrics").text, "symguard_batch_size")
        whole = c.post("/v1/score", files=[("f", p) for p in pngs])
        after = _histogram(c.get("/metrics").text, "symguard_batch_size")
    assert whole.status_code == 200, whole.text
    assert (after[0] - before[0], after[1] - before[1]) == (10, 2)  # images, session.runs
    for row, one in zip(whole.json()["results"], alone, strict=True):
        (single,) = one["results"]
        assert angle_diff(row["angle_deg"], single["angle_deg"]) < 1e-3
        assert row["reflected"] == single["reflected"] and row["class_name"] == single["class_name"]
        assert row["score"] == pytest.approx(single["score"], abs=1e-4)


def test_full_queue_answers_503_with_retry_after(bundle_repo, mnist_digits):
    digits, _ = mnist_digits
    files = [("f", moved_png(digits[i], 0, False)) for i in range(64)]
    statuses: list[int] = []
    bodies: list[httpx.Response] = []
    lock = threading.Lock()
    with LiveServer(repository=bundle_repo, max_batch=1, max_delay_ms=0, queue_size=1) as s:
        start = threading.Barrier(16)

        def call() -> None:
            with httpx.Client(base_url=s.url, timeout=30) as c:
                start.wait()
                for _ in range(3):
                    r = c.post("/v1/score", files=files)
                    with lock:
                        statuses.append(r.status_code)
                        bodies.append(r)

        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with s.client() as c:
            still = c.post("/v1/score", files=files[:1])
    assert set(statuses) <= {200, 503}
    assert 200 in statuses and 503 in statuses, statuses
    full = next(r for r in bodies if r.status_code == 503)
    assert full.headers["retry-after"] == "1" and full.json()["code"] == "queue_full"
    assert still.status_code == 200  # the worker survived the overload
    assert all(len(r.json()["results"]) == 64 for r in bodies if r.status_code == 200)


def test_requests_past_max_in_flight_get_503_before_their_body_is_read(bundle_repo, mnist_digits, caplog):
    """Two requests whose bodies are still arriving hold both places; the third is refused at the door with
    Retry-After, GETs (metrics, health) still answer, and once the two finish, scoring is open again."""
    digit = moved_png(mnist_digits[0][0], 0, False)
    with LiveServer(repository=bundle_repo, max_in_flight=2) as s:
        held = [hold_request(s.url, digit) for _ in range(2)]  # in progress until the rest of each body arrives
        with s.client() as c:
            for _ in range(100):  # the server has seen both once its gauge says so
                if "symguard_requests_in_progress 2.0" in c.get("/metrics").text:
                    break
            refused = c.post("/v1/score", content=digit, headers={"content-type": "image/png"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "overloaded" and refused.headers["retry-after"] == "1"
            assert c.get("/healthz").status_code == 200
            assert "symguard_requests_shed_total 1.0" in c.get("/metrics").text
            assert any("overloaded: 1 request(s) refused" in r.getMessage() for r in caplog.records), "shedding is logged"
            for sock in held:  # the rest of each body: both are scored
                sock.sendall(digit[len(digit) // 2 :])
                assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "a held request must still be answered"
                sock.close()
            assert c.post("/v1/score", content=digit, headers={"content-type": "image/png"}).status_code == 200


@pytest.mark.parametrize("max_batch", [4])
def test_requests_larger_than_max_batch_still_answered_whole(bundle_repo, mnist_digits, max_batch):
    digits, _ = mnist_digits
    with LiveServer(repository=bundle_repo, max_batch=max_batch, max_delay_ms=1) as s, s.client() as c:
        r = c.post("/v1/score", files=[("f", moved_png(digits[i], 0, False)) for i in range(10)])
        one = c.post("/v1/score", content=moved_png(digits[9], 0, False), headers={"content-type": "image/png"})
    assert r.status_code == 200 and len(r.json()["results"]) == 10
    assert r.json()["results"][9]["angle_deg"] == pytest.approx(one.json()["results"][0]["angle_deg"], abs=1e-3)


def test_a_batch_waits_for_more_only_while_another_request_is_in_progress(bundle_repo, mnist_digits):
    """max_delay 1 s, timeout 0.5 s: alone, a request does not wait for company (200); with another request in
    progress (its body still arriving) the batch waits for it, past the timeout (504), and the worker lives on."""
    body = moved_png(mnist_digits[0][0], 0, False)
    with (
        LiveServer(repository=bundle_repo, max_batch=64, max_delay_ms=1000, request_timeout_s=0.5) as s,
        s.client() as c,
    ):
        alone = c.post("/v1/score", content=body, headers={"content-type": "image/png"})
        held = hold_request(s.url, body)
        for _ in range(100):
            if "symguard_requests_in_progress 1.0" in c.get("/metrics").text:
                break
        late = c.post("/v1/score", content=body, headers={"content-type": "image/png"})
        held.close()
        s.settings.request_timeout_s = 5.0  # the same worker, now with time to answer
        ok = c.post("/v1/score", content=body, headers={"content-type": "image/png"})
    assert alone.status_code == 200, alone.text
    assert late.status_code == 504 and late.json()["code"] == "inference_timeout"
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1
