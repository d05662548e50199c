"""`symguard eval-guard` end to end on a small sample: real processes on 127.0.0.1, the test bundle fixture.

The fixture bundle is untrained, so only structure and the classifier-side figures are checked, not the guard's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.guard_eval import TRANSFORMS, GuardEvalReport, choose_model, evaluate

N = 24  # everything is seeded and deterministic, so a small sample gives the same figures on every run


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYMGUARD_")}
    return {**env, "SYMGUARD_INTRA_OP_THREADS": "1", **extra}


def _check(report: GuardEvalReport, model: str) -> None:
    rows = {r.transform: r for r in report.rows}
    assert list(rows) == [t.name for t in TRANSFORMS]
    assert report.model == model and report.n == N
    for r in report.rows:
        assert r.n == N and r.errors == 0
        for v in (r.direct_accuracy, r.oracle_accuracy, r.canonicalize_accuracy, r.gate_rejected):
            assert 0.0 <= v <= 1.0
        assert r.gate_forwarded_accuracy is None or 0.0 <= r.gate_forwarded_accuracy <= 1.0
        # Turning each image back with its true pose restores the upright accuracy: the rotation codes agree.
        assert r.oracle_accuracy >= 0.9, r
    assert rows["upright"].direct_accuracy >= 0.9
    # The demo classifier never saw a rotated or mirrored digit: that is what the guard is for.
    assert rows["rotated ±180°"].direct_accuracy < rows["upright"].direct_accuracy - 0.2
    assert rows["mirrored"].direct_accuracy < rows["upright"].direct_accuracy - 0.2
    table = report.table()
    assert table.count("\n| ") == len(TRANSFORMS) + 1  # header + one line per transform


def _guard_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "service.cli", "guard", "--help"], capture_output=True, env=_env(), timeout=60)
    return r.returncode == 0


@pytest.fixture(scope="module")
def guard_report(bundle_repo: Path) -> GuardEvalReport:
    """`symguard eval-guard --json` as a user runs it: upstream + two `symguard guard` processes."""
    if not _guard_available():
        pytest.xfail("`symguard guard` is not available in this tree yet")
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "eval-guard", "--repository", str(bundle_repo),
         "--n", str(N), "--seed", "1", "--json"],
        capture_output=True, text=True, env=_env(), timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return GuardEvalReport.model_validate(json.loads(r.stdout))


def test_eval_guard_through_the_guard(guard_report: GuardEvalReport):
    assert guard_report.via == "guard"
    _check(guard_report, "digits:1")


def test_client_side_canonicalize_and_gate_agree_with_the_guard(guard_report: GuardEvalReport, bundle_repo: Path):
    """/v1/canonicalize + upstream and /v1/score's verdict give the guard's figures exactly: same images, same code."""
    served = evaluate(repository=bundle_repo, n=N, seed=1, via="serve")
    _check(served, "digits:1")
    assert [r.model_dump() for r in served.rows] == [r.model_dump() for r in guard_report.rows]


def test_choose_model_prefers_the_upright_bundle(tmp_path: Path):
    def bundle(name: str) -> None:
        (tmp_path / name / "1").mkdir(parents=True)

    bundle("zeta")
    assert choose_model(tmp_path) == "zeta"
    bundle("mnist-multiple-flip")
    assert choose_model(tmp_path) == "mnist-multiple-flip"
    bundle("mnist")
    assert choose_model(tmp_path) == "mnist"
