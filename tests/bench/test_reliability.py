"""The load and fault scenarios of bench/reliability.py, CI-sized: the same code, real `symguard` processes on
127.0.0.1, fewer requests and seconds. The full-size figures in RELIABILITY.md come from `python -m bench.reliability
all`. Each scenario's own checks are the issue's properties; here every one must hold, and no request may be lost."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from bench import reliability as rel


@pytest.fixture(scope="module")
def env() -> rel.Env:
    repo = rel.shipped_repository()
    return rel.Env(repo, rel.default_model(repo), Path(tempfile.mkdtemp(prefix="symguard-rel-test-")), rel.digit_pngs(32))


def _run(coro, not_at_ci_size: tuple[str, ...] = ()) -> rel.Outcome:
    o = asyncio.run(coro)
    failed = {k: v for k, v in o.checks.items() if not v and k not in not_at_ci_size}
    assert not failed, f"{o.scenario}: failed {list(failed)}; figures {o.figures}"
    return o


def test_overload_sheds_with_retry_after_and_recovers(env: rel.Env) -> None:
    # 12 s instead of 60: the connection ramp (~2,000 sockets opening) takes a few seconds of it, and connects the
    # kernel dropped at the ramp come back for up to ~15 s (SYN back-off), so "RSS flat from a quarter in" and
    # "recovered within 5 s" are checked at full size only; here: bounded memory, and recovery within 20 s
    o = _run(
        rel.overload(env, seconds=12, capacity_seconds=3, queue_size=64, after_s=20),
        not_at_ci_size=("RSS flat (<=5%)", "latency recovered within 5 s"),
    )
    f = o.figures
    assert f["lost"] == 0 and f["sent"] == f["answered"] > 0
    assert f["statuses"].get("503", 0) > 0, "2x capacity must shed something"
    assert f["queue_depth_max"] <= 64 and f["in_progress_max"] <= 512
    assert f["rss_max_mb"] < 400, "the issue's memory ceiling for the default bundle"
    assert f["recovery_s"] is not None and f["recovery_s"] < 20


def test_soak_keeps_memory_and_fds_flat(env: rel.Env) -> None:
    o = _run(rel.soak(env, requests=6000, concurrency=8, warmup=1000))
    assert o.figures["lost"] == 0 and o.figures["answered"] == 6000


def test_reload_under_load_loses_nothing_and_names_the_version(env: rel.Env) -> None:
    o = _run(rel.reload_under_load(env, reloads=6))
    assert o.figures["lost"] == 0
    assert set(o.figures["versions"]) == {"1", "2"}, "both versions must have scored during the swaps"


def test_broken_bundles_are_refused_and_the_old_version_serves(env: rel.Env) -> None:
    o = _run(rel.broken_bundles(env))
    assert [a["code"] for a in o.figures["attempts"]] == [a["expected"] for a in o.figures["attempts"]]
    assert all(a["failures_delta"] >= 1 and a["version_after"] == 1 for a in o.figures["attempts"])


def test_guard_faults_fail_open_and_closed_as_configured(env: rel.Env) -> None:
    o = _run(rel.guard_faults(env, seconds=3, concurrency=4))
    assert len(o.figures["runs"]) == 6, "3 faults x fail_open/fail_closed"
    assert all(r["lost"] == 0 and r["alive"] for r in o.figures["runs"])


def test_sigterm_finishes_in_flight_requests(env: rel.Env) -> None:
    o = _run(rel.shutdown(env, concurrency=16, load_s=2.0))
    f = o.figures
    assert f["exit_code"] == 0 and f["in_flight_at_sigterm"] > 0
    assert f["before_statuses"] == {200: f["sent_before"]}
