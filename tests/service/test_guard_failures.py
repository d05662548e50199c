"""symguard guard when things go wrong: undecodable images, scoring timeouts (fail_open / fail_closed), an upstream
that is down or too slow, oversized bodies. The guard answers with typed JSON errors and stays up."""

from __future__ import annotations

import hashlib

import pytest
from _guard_support import GuardPool, free_port, samples
from _support import png

PNG = {"content-type": "image/png"}



def outcome(c, mode: str, name: str) -> float:
    return samples(c, "symguard_guard_requests_total", mode=mode, outcome=name)


# ---------------------------------------------------------------- bad images


@pytest.mark.parametrize("body", [b"not an image at all", "truncated"])
def test_bad_image_is_the_scoring_apis_4xx_in_gate_and_canonicalize(guard, mnist_digits, body):
    digits, _ = mnist_digits
    data = png(digits[0])[:60] if body == "truncated" else body
    for mode in ("gate", "canonicalize"):
        with guard(mode=mode).client() as c:
            api = c.post("/symguard/v1/score", content=data, headers=PNG)
            before = outcome(c, mode, "bad_image")
            r = c.post("/predict", content=data, headers=PNG)
            assert r.status_code == api.status_code and 400 <= r.status_code < 500, r.text
            assert r.json()["code"] == api.json()["code"] and "image" not in r.json()  # not the upstream's answer
            assert outcome(c, mode, "bad_image") == before + 1


def test_bad_image_is_forwarded_and_counted_in_monitor_and_annotate(guard):
    for mode in ("monitor", "annotate"):
        with guard(mode=mode).client() as c:
            before = outcome(c, mode, "bad_image")
            r = c.post("/predict", content=b"\x89PNG\r\n\x1a\n broken", headers=PNG)
            assert r.status_code == 200 and r.json()["path"] == "/predict"
            seen = dict(r.json()["headers"])
            if mode == "annotate":
                assert seen["x-symguard-verdict"] == "unscored" and seen["x-symguard-reason"] == "bad_image"
            else:
                assert "x-symguard-verdict" not in seen
            assert outcome(c, mode, "bad_image") == before + 1


def test_malformed_json_or_base64_in_gate_mode_is_422_not_a_bypass(guard):
    g = guard(mode="gate", image_location="json:/image")
    with g.client() as c:
        not_json = c.post("/predict", content=b"{nope", headers={"content-type": "application/json"})
        not_b64 = c.post("/predict", json={"image": "%%% not base64"})
        not_str = c.post("/predict", json={"image": 12})
    assert not_json.status_code == 422 and not_json.json()["code"] == "bad_request"
    assert not_b64.status_code == 422 and not_b64.json()["code"] == "invalid_base64"
    assert not_str.status_code == 422 and not_str.json()["code"] == "invalid_base64"


def test_body_over_the_limit_is_413_before_the_upstream(guard):
    g = guard(mode="gate", max_body_bytes=4096)
    with g.client() as c:
        sized = c.post("/predict", content=b"\0" * 10_000, headers=PNG)
        chunked = c.post("/predict", content=iter([b"\0" * 3000, b"\0" * 3000]), headers=PNG)
        text = {"content-type": "text/plain"}
        streamed = c.post("/predict", content=iter([b"\0" * 3000, b"\0" * 3000]), headers=text)
        healthy = c.get("/healthz")
    assert sized.status_code == 413 and sized.json()["code"] == "payload_too_large"
    assert chunked.status_code == 413 and streamed.status_code == 413
    assert healthy.status_code == 200


# ---------------------------------------------------------------- scoring timeouts


def test_score_timeout_fail_open_forwards_unscored(guard, mnist_digits):
    digits, _ = mnist_digits
    image = png(digits[1])
    g = guard(mode="annotate", score_timeout_s=1e-6, on_failure="fail_open")
    with g.client() as c:
        before = samples(c, "symguard_guard_fail_open_total", reason="timeout")
        opened = outcome(c, "annotate", "fail_open")
        r = c.post("/predict", content=image, headers=PNG)
        after = samples(c, "symguard_guard_fail_open_total", reason="timeout")
        assert outcome(c, "annotate", "fail_open") == opened + 1
    assert r.status_code == 200 and r.json()["body_sha256"] == hashlib.sha256(image).hexdigest()
    seen = dict(r.json()["headers"])
    assert seen["x-symguard-verdict"] == "unscored" and seen["x-symguard-reason"] == "timeout"
    assert "x-symguard-score" not in seen
    assert after == before + 1


def test_score_timeout_fail_closed_answers_503(guard, mnist_digits):
    digits, _ = mnist_digits
    g = guard(mode="gate", score_timeout_s=1e-6, on_failure="fail_closed")
    with g.client() as c:
        before = outcome(c, "gate", "fail_closed")
        opened = samples(c, "symguard_guard_fail_open_total")
        r = c.post("/predict", content=png(digits[1]), headers=PNG)
        assert outcome(c, "gate", "fail_closed") == before + 1
        assert samples(c, "symguard_guard_fail_open_total") == opened
        no_image = c.get("/not/an/image")  # requests without an image never wait for scoring
    assert r.status_code == 503 and r.json()["code"] == "scoring_unavailable" and r.json()["reason"] == "timeout"
    assert r.headers["retry-after"] == "1"
    assert no_image.status_code == 200


def test_monitor_never_blocks_even_when_told_to_fail_closed(guard, mnist_digits):
    digits, _ = mnist_digits
    g = guard(mode="monitor", score_timeout_s=1e-6, on_failure="fail_closed")
    with g.client() as c:
        before = outcome(c, "monitor", "fail_open")
        r = c.post("/predict", content=png(digits[1]), headers=PNG)
        assert outcome(c, "monitor", "fail_open") == before + 1
    assert r.status_code == 200


# ---------------------------------------------------------------- upstream failures


def test_upstream_down_is_502_and_the_guard_stays_up(bundle_repo, mnist_digits):
    digits, _ = mnist_digits
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    with GuardPool(repository=bundle_repo, upstream=dead) as pool, pool(mode="gate").client() as c:
        r = c.post("/predict", content=png(digits[0]), headers=PNG)
        plain = c.get("/whatever")
        assert samples(c, "symguard_guard_upstream_errors_total", kind="connect") == 2
        assert outcome(c, "gate", "upstream_error") == 2
        assert samples(c, "symguard_guard_upstream_duration_seconds_count") == 2
        live, ready = c.get("/healthz"), c.get("/readyz")
    assert r.status_code == 502 and r.json()["code"] == "upstream_unavailable"
    assert plain.status_code == 502
    assert live.status_code == 200 and ready.status_code == 200  # readiness is about scoring, not the upstream


def test_slow_upstream_is_504_and_the_next_request_is_fine(guard, mnist_digits):
    digits, _ = mnist_digits
    g = guard(mode="annotate", upstream_timeout_s=0.3)
    with g.client() as c:
        before = samples(c, "symguard_guard_upstream_errors_total", kind="timeout")
        slow = c.post("/predict", content=png(digits[0]), headers={**PNG, "x-echo-sleep": "1"})
        assert samples(c, "symguard_guard_upstream_errors_total", kind="timeout") == before + 1
        fine = c.post("/predict", content=png(digits[0]), headers=PNG)
    assert slow.status_code == 504 and slow.json()["code"] == "upstream_timeout"
    assert fine.status_code == 200 and fine.headers["x-symguard-verdict"] in ("in", "ood")


def test_upstream_error_statuses_are_passed_through_not_rewritten(guard):
    with guard(mode="monitor").client() as c:
        errors, forwarded = outcome(c, "monitor", "upstream_error"), outcome(c, "monitor", "no_image")
        r = c.get("/x", headers={"x-echo-status": "503"})
        assert outcome(c, "monitor", "upstream_error") == errors  # an upstream that answers is not an upstream error
        assert outcome(c, "monitor", "no_image") == forwarded + 1
    assert r.status_code == 503 and r.json()["path"] == "/x"  # the upstream's own answer
