"""Prometheus metrics: prefix symguard_, base units (seconds), labels from bounded sets only.

Each app gets its own CollectorRegistry, so several servers (tests) can live in one process.

With several server processes (`--processes N`, service/workers.py) prometheus_client runs in multiprocess mode:
every process writes its values to files in PROMETHEUS_MULTIPROC_DIR and /metrics, whichever process answers it,
reads all of them. Counters and histograms add up; each gauge says how (the multiprocess_mode arguments below).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service.runtime import cuda_fell_back
from service.scoring import ImageScore

MAX_GROUP_LABELS = 64  # a manifest with more groups folds the rest into "other"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)
ANGLE_BUCKETS = (5.0, 10.0, 15.0, 22.5, 30.0, 45.0, 60.0, 90.0, 120.0, 150.0, 180.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "symguard_requests", "HTTP requests by route template and status code.", ["endpoint", "code"], registry=r
        )
        self.request_duration = Histogram(
            "symguard_request_duration_seconds",
            "HTTP request latency.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "symguard_decisions", "Per-image verdicts.", ["model", "decision", "reason", "group"], registry=r
        )
        self.ood_score = Histogram(
            "symguard_ood_score", "Per-image score (>1 means OOD).", ["model"], buckets=SCORE_BUCKETS, registry=r
        )
        self.angle = Histogram(
            "symguard_angle_degrees",
            "Per-image |rotation angle| the pose network measured, 0..180.",
            ["model"],
            buckets=ANGLE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "symguard_batch_size", "Images per session.run.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "symguard_queue_depth", "Requests waiting for a batch.", ["model"], registry=r, multiprocess_mode="livesum"
        )
        self.in_progress = Gauge(
            "symguard_requests_in_progress",
            "Non-GET requests being read, decoded, queued or scored.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.shed = Counter(
            "symguard_requests_shed",
            "Requests refused with 503 at the door: max_in_flight were in progress.",
            registry=r,
        )
        self.inference_duration = Histogram(
            "symguard_inference_duration_seconds",
            "session.run plus scoring, per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "symguard_model_info",
            "Served model version and its real execution provider.",
            ["model", "version", "provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.provider_fallback = Gauge(
            "symguard_provider_fallback",
            "1 when this ONNX Runtime build offers CUDAExecutionProvider but the model runs on something else.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.equivariance_error = Gauge(
            "symguard_equivariance_error",
            "Startup self-check: worst relative equivariance error on probes.",
            ["model", "transform"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.reload_failures = Counter(
            "symguard_reload_failures", "Loads or reloads that failed and kept the old version.", ["model"], registry=r
        )
        self.ready = Gauge(
            "symguard_ready", "1 when the server (every process of it) reports ready.", registry=r,
            multiprocess_mode="livemin",
        )  # fmt: skip

    def record_rows(self, rows: list[ImageScore], groups: set[str]) -> None:
        for row in rows:
            group = row.group if row.group in groups else "other"
            self.decisions.labels(row.model, row.verdict, row.reason or "none", group).inc()
            self.ood_score.labels(row.model).observe(row.score)
            self.angle.labels(row.model).observe(abs(row.angle_deg))

    def model_loaded(
        self, name: str, version: int, provider: str, errors: dict[str, float], previous: tuple[int, str] | None
    ) -> None:
        if previous is not None:
            # 0 first: in multiprocess mode remove() leaves this process's file value behind, and livemax reads it
            self.model_info.labels(name, str(previous[0]), previous[1]).set(0)
            try:
                self.model_info.remove(name, str(previous[0]), previous[1])
            except KeyError:
                pass
        self.model_info.labels(name, str(version), provider).set(1)
        self.provider_fallback.labels(name).set(1 if cuda_fell_back(provider) else 0)
        self.reload_failures.labels(name)  # expose the series at 0, so alerts can use increase() from the start
        for transform, err in errors.items():
            self.equivariance_error.labels(name, transform).set(err)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every process's values, not just this one's
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


# ---------------------------------------------------------------- symguard guard

GUARD_OUTCOMES = ("forwarded", "blocked", "no_image", "bad_image", "fail_open", "fail_closed", "upstream_error")
GUARD_FAIL_OPEN_REASONS = ("timeout", "error")
GUARD_UPSTREAM_ERROR_KINDS = ("connect", "timeout", "other")
UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GuardMetrics:
    """The proxy's own counters, in the app's registry. Every label value is pre-created at 0 so that increase()
    and rate() work from the first scrape. Per-image verdicts still go through Metrics.record_rows (the batcher)."""

    def __init__(self, metrics: Metrics, mode: str) -> None:
        r = metrics.registry
        self.mode = mode
        self.requests = Counter(
            "symguard_guard_requests",
            "Requests through the guard proxy, by mode and what became of them.",
            ["mode", "outcome"],
            registry=r,
        )
        self.fail_open = Counter(
            "symguard_guard_fail_open",
            "Requests forwarded unscored because scoring timed out or failed.",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "symguard_guard_upstream_errors", "Failed upstream exchanges, by kind.", ["kind"], registry=r
        )
        self.upstream_duration = Histogram(
            "symguard_guard_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers (or the failure).",
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        for outcome in GUARD_OUTCOMES:
            self.requests.labels(mode, outcome)
        for reason in GUARD_FAIL_OPEN_REASONS:
            self.fail_open.labels(reason)
        for kind in GUARD_UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind)

    def outcome(self, outcome: str) -> None:
        self.requests.labels(self.mode, outcome).inc()

    def failed_open(self, reason: str) -> None:
        self.fail_open.labels(reason).inc()

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()
