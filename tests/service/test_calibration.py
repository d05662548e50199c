"""Calibration (service/scoring.py calibrate_groups): the false-alarm rate it promises, measured on fresh draws.

Conformal guarantees hold on average over calibration sets, so the rate check averages over many of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.scoring import calibrate_groups, conformal_threshold

ALPHA = 0.01
REPEATS = 300


def _draw(rng: np.random.Generator, sizes: list[int], scales: list[float], zeros: list[float]):
    """Scores per group: exponential at the group's scale, exactly 0 with the group's probability."""
    idx = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])
    s = rng.exponential(np.array(scales)[idx]) * (rng.random(len(idx)) >= np.array(zeros)[idx])
    return idx, s


def test_a_group_with_enough_scores_gets_its_own_threshold_and_a_small_one_borrows_them_all():
    rng = np.random.default_rng(1)
    idx, s = _draw(rng, [1000, 50], [1.0, 5.0], [0.0, 0.0])
    big, small = calibrate_groups(["big", "small"], idx, s, np.zeros_like(s), ALPHA)
    mine = np.sort(s[idx == 0])
    assert big.rotation_threshold == mine[math.ceil(1001 * (1 - ALPHA / 2)) - 1]
    assert big.rotation_scores == pytest.approx(mine, abs=1e-5)
    assert len(small.rotation_scores) == 1050  # 50 are too few to certify α/2 = 0.5% (200 needed)
    assert small.rotation_threshold == conformal_threshold(s, ALPHA / 2)


def test_small_groups_together_keep_the_rate():
    """Four groups of 50 at scales 100x apart, two of them mostly exact zeros: over the four, fresh in-distribution
    scores exceed their group's threshold at most α/2 of the time (the rate the rotation score is given)."""
    sizes, scales, zeros = [50, 50, 50, 50], [0.1, 1.0, 1.0, 10.0], [0.0, 0.95, 0.5, 0.0]
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(REPEATS):
        idx, s = _draw(rng, sizes, scales, zeros)
        thr = np.array([g.rotation_threshold for g in calibrate_groups(list("abcd"), idx, s, np.zeros_like(s), ALPHA)])
        fresh_idx, fresh = _draw(rng, [2000] * 4, scales, zeros)
        rates.append((fresh > thr[fresh_idx]).mean())
    assert ALPHA / 2 - 0.003 <= np.mean(rates) <= ALPHA / 2 + 0.001, np.mean(rates)


def test_poses_drawn_from_one_image_count_once_toward_a_group_threshold():
    """60 digits drawn 8 times each are 480 scores but 60 sources: too few for a class threshold at α/2 (200), so
    the class borrows every group's scores; counted per draw it would have had its own."""
    rng = np.random.default_rng(2)
    per_digit = rng.exponential(1.0, 60)
    small = np.repeat(per_digit, 8) * rng.uniform(0.9, 1.1, 480)  # a digit's draws score alike
    big = rng.exponential(3.0, 1000)
    s = np.concatenate([small, big])
    idx = np.concatenate([np.zeros(480, int), np.ones(1000, int)])
    sources = np.concatenate([np.repeat(np.arange(60), 8), 60 + np.arange(1000)])
    per_draw, _ = calibrate_groups(["digits", "big"], idx, s, np.zeros_like(s), ALPHA)
    per_source, big_cal = calibrate_groups(["digits", "big"], idx, s, np.zeros_like(s), ALPHA, sources=sources)
    assert per_draw.rotation_threshold == conformal_threshold(small, ALPHA / 2)
    assert per_source.rotation_threshold == conformal_threshold(s, ALPHA / 2) > per_draw.rotation_threshold
    assert len(per_source.rotation_scores) == len(s)
    assert big_cal.rotation_threshold == conformal_threshold(big, ALPHA / 2)
