"""/metrics after real traffic: every documented family present, labels bounded to route templates."""

from __future__ import annotations

import re

from _support import png

FAMILIES = [
    "symguard_requests_total",
    "symguard_request_duration_seconds_bucket",
    "symguard_decisions_total",
    "symguard_ood_score_bucket",
    "symguard_batch_size_bucket",
    "symguard_queue_depth",
    "symguard_inference_duration_seconds_bucket",
    "symguard_model_info",
    "symguard_equivariance_error",
    "symguard_reload_failures_total",
    "symguard_ready",
]


def test_metrics_after_traffic(server, mnist_digits):
    digits, _ = mnist_digits
    with server.client() as c:
        for i in range(3):
            c.post("/v1/score", files=[("f", png(digits[i * 100 + j])) for j in range(4)])
        c.post("/v1/score", content=b"junk", headers={"content-type": "image/png"})
        c.get("/v2/models/digits/versions/1/ready")
        c.get("/no/such/path/123")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for family in FAMILIES:
        assert re.search(rf"^{family}[{{ ]", text, re.M), family
    assert re.search(r'symguard_requests_total{code="200",endpoint="/v1/score"} [1-9]', text)
    assert 'symguard_requests_total{code="415",endpoint="/v1/score"}' in text
    assert 'endpoint="/v2/models/{name}/versions/{version}/ready"' in text  # route template, not the raw path
    assert 'endpoint="other"' in text and "/no/such/path" not in text
    assert 'symguard_model_info{model="digits",provider="CPUExecutionProvider",version="1"} 1.0' in text
    decided = sum(
        float(v) for v in re.findall(r'^symguard_decisions_total{[^}]*model="digits"[^}]*} (\S+)', text, re.M)
    )
    assert decided >= 12
    rot90 = float(re.search(r'symguard_equivariance_error{model="digits",transform="rot90"} (\S+)', text).group(1))
    assert 0 <= rot90 < 1e-3
    assert re.search(r"^symguard_ready 1\.0", text, re.M)
