"""Calibration (service/scoring.py calibrate_groups): the false-alarm rate it promises, measured on fresh draws.

Conformal guarantees hold on average over calibration sets, so each check averages over many of them.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.scoring import calibrate_groups

ALPHA = 0.01
REPEATS = 300


def _draw(rng: np.random.Generator, sizes: list[int], scales: list[float], zeros: list[float]):
    """Scores per group: exponential at the group's scale, exactly 0 with the group's probability."""
    idx = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])
    s = rng.exponential(np.array(scales)[idx]) * (rng.random(len(idx)) >= np.array(zeros)[idx])
    return idx, s


def _false_alarms(sizes, scales, zeros, seed=0) -> np.ndarray:
    """Mean rate over REPEATS calibration sets of a fresh score above its group's rotation threshold, per group."""
    rng = np.random.default_rng(seed)
    names = [f"g{g}" for g in range(len(sizes))]
    rates = np.zeros(len(sizes))
    for _ in range(REPEATS):
        idx, s = _draw(rng, sizes, scales, zeros)
        groups = calibrate_groups(names, idx, s, np.zeros_like(s), ALPHA)
        fresh_idx, fresh = _draw(rng, [2000] * len(sizes), scales, zeros)
        thr = np.array([g.rotation_threshold for g in groups])
        for g in range(len(sizes)):
            rates[g] += (fresh[fresh_idx == g] > thr[g]).mean()
    return rates / REPEATS


def test_small_groups_share_a_normalised_threshold_that_keeps_the_rate():
    """Four groups of 50 (too few for α/2 = 0.5% each) at scales 100x apart: together they hold α/2, no group
    pays for the others, and each threshold follows its own group's scale instead of the widest group's."""
    sizes, scales, zeros = [50, 50, 50, 50], [0.1, 1.0, 1.0, 10.0], [0.0, 0.0, 0.5, 0.0]
    rates = _false_alarms(sizes, scales, zeros)
    assert ALPHA / 2 - 0.003 <= rates.mean() <= ALPHA / 2 + 0.002, rates
    assert rates.max() < 0.02, rates
    idx, s = _draw(np.random.default_rng(3), sizes, scales, zeros)
    thr = [g.rotation_threshold for g in calibrate_groups(list("abcd"), idx, s, np.zeros_like(s), ALPHA)]
    assert 20 < thr[3] / thr[0] < 500, thr  # a raw pooled threshold would be the same number for all four


def test_a_group_with_enough_scores_gets_its_own_threshold():
    rng = np.random.default_rng(1)
    idx, s = _draw(rng, [1000, 50], [1.0, 5.0], [0.0, 0.0])
    big, small = calibrate_groups(["big", "small"], idx, s, np.zeros_like(s), ALPHA)
    mine = np.sort(s[idx == 0])
    assert big.rotation_threshold == mine[int(np.ceil(1001 * (1 - ALPHA / 2))) - 1]
    assert big.rotation_scores == pytest.approx(mine[np.linspace(0, 999, 1000).round().astype(int)], abs=1e-5)
    # the small group alone is below 200 scores, so it borrows every group's scores, normalised to its scale
    assert len(small.rotation_scores) == 1050
    assert 2.5 < small.rotation_threshold / big.rotation_threshold < 10  # the scales are 5x apart


def test_a_group_whose_scores_are_mostly_zero_borrows_a_scale_instead_of_a_zero_threshold():
    """95% of its scores are exactly 0, so its 90th percentile is no scale; it borrows the pool's. (Mostly-zero
    groups are what the old calibration got wrong: counted with their duplicates, they passed for large groups and
    got a threshold of 0, so every positive score was a false alarm.)"""
    sizes, scales, zeros = [50, 50, 50, 50], [1.0, 1.0, 1.0, 1.0], [0.95, 0.0, 0.0, 0.0]
    rates = _false_alarms(sizes, scales, zeros, seed=2)
    assert rates[0] < 0.02, rates
    assert rates.mean() <= ALPHA / 2 + 0.002, rates
