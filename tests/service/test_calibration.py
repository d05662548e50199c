"""Calibration (service/scoring.py calibrate_groups): the false-alarm rate it promises, measured on fresh draws.

Two scores (rotation, reflection) flag an input; the thresholds are set together so that the union flags α.

Conformal guarantees hold on average over calibration sets, so the rate check averages over many of them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.scoring import calibrate_groups, p_values

ALPHA = 0.01
REPEATS = 300


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """The reference a single score is held to: its ceil((n+1)(1-α))-th smallest; +inf with too few to certify α."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(s) + 1) * (1.0 - alpha))
    return float(s[k - 1]) if 1 <= k <= len(s) else math.inf


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
    # no reflection score ever passes 0, so the rotation score gets all of α
    assert big.rotation_threshold == mine[math.ceil(1001 * (1 - ALPHA)) - 1] == conformal_threshold(mine, ALPHA)
    assert big.rotation_scores == pytest.approx(mine, abs=1e-5)
    assert len(small.rotation_scores) == 1050  # 50 are too few to certify α/2 = 0.5% (200 needed)
    assert small.rotation_threshold == conformal_threshold(s, ALPHA)


def test_small_groups_together_keep_the_rate():
    """Four groups of 50 at scales 100x apart, two of them mostly exact zeros: over the four, fresh in-distribution
    scores exceed their group's threshold at most α of the time, and not much less."""
    sizes, scales, zeros = [50, 50, 50, 50], [0.1, 1.0, 1.0, 10.0], [0.0, 0.95, 0.5, 0.0]
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(REPEATS):
        idx, s = _draw(rng, sizes, scales, zeros)
        thr = np.array([g.rotation_threshold for g in calibrate_groups(list("abcd"), idx, s, np.zeros_like(s), ALPHA)])
        fresh_idx, fresh = _draw(rng, [2000] * 4, scales, zeros)
        rates.append((fresh > thr[fresh_idx]).mean())
    assert ALPHA - 0.003 <= np.mean(rates) <= ALPHA + 0.001, np.mean(rates)


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
    assert per_draw.rotation_threshold == conformal_threshold(small, ALPHA)
    assert per_source.rotation_threshold == conformal_threshold(s, ALPHA) > per_draw.rotation_threshold
    assert len(per_source.rotation_scores) == len(s)
    assert big_cal.rotation_threshold == conformal_threshold(big, ALPHA)


@pytest.mark.parametrize("coupling", ["same inputs", "independent"])
def test_the_two_scores_together_flag_alpha_and_the_p_value_says_so(coupling: str):
    """Where both scores flag the same inputs, thresholds at α/2 each (Bonferroni) would flag only α/2 of them;
    set together they flag α, whether the scores move together or not. The reported p-value is at most α exactly
    for the inputs flagged."""
    rng = np.random.default_rng(3)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        rot = rng.exponential(1.0, n)
        ref = rot / (1.0 + rot) if coupling == "same inputs" else rng.uniform(0.0, 1.0, n)
        return rot, ref

    rates, bonferroni, agree = [], [], []
    for _ in range(REPEATS):
        rot, ref = draw(1000)
        (g,) = calibrate_groups(["all"], np.zeros(1000, int), rot, ref, ALPHA)
        t_half = conformal_threshold(rot, ALPHA / 2), conformal_threshold(ref, ALPHA / 2)
        f_rot, f_ref = draw(2000)
        flagged = (f_rot > g.rotation_threshold) | (f_ref > g.reflection_threshold)
        rates.append(flagged.mean())
        bonferroni.append(((f_rot > t_half[0]) | (f_ref > t_half[1])).mean())
        p = np.minimum(1.0, g.union_factor * np.minimum(
            p_values(np.sort(rot), f_rot), p_values(np.sort(ref), f_ref)))  # fmt: skip
        agree.append(((p <= ALPHA) == flagged).mean())
    assert ALPHA - 0.002 <= np.mean(rates) <= ALPHA + 0.001, np.mean(rates)
    if coupling == "same inputs":
        assert np.mean(bonferroni) < 0.6 * ALPHA, np.mean(bonferroni)
    assert np.mean(agree) > 0.999, np.mean(agree)
