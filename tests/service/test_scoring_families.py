"""The rotation score per rotation family: uniform compares |φ| with the half-width, cyclic measures the distance
to the nearest allowed pose of C_n (the level being half the period, 180°/n)."""

from __future__ import annotations

import numpy as np

from service.scoring import cyclic_period, rotation_excess


def test_cyclic_period_snaps_the_level_to_a_group_order():
    level = np.array([180.0, 91.0, 60.5, 44.0, 20.0, 1.0])  # C1, C2, C3, C4, C8 (clipped at 8), C8
    assert np.allclose(cyclic_period(level), [360.0, 180.0, 120.0, 90.0, 45.0, 45.0])


def test_cyclic_excess_is_the_distance_to_the_nearest_group_element():
    angle = np.array([0.0, 89.0, 135.0, -178.0, 44.0, -91.0])
    level = np.full(6, 45.0)  # C4: allowed poses 0, ±90, 180
    excess, limit = rotation_excess(angle, level, "cyclic")
    assert np.allclose(excess, [0.0, 1.0, 45.0, 2.0, 44.0, 1.0])
    assert np.allclose(limit, 22.5)
    assert list(excess > limit) == [False, False, True, False, True, False]


def test_uniform_excess_is_the_absolute_angle_against_the_width():
    angle = np.array([-30.0, 10.0, 170.0])
    excess, limit = rotation_excess(angle, np.array([20.0, 20.0, 180.0]), "uniform")
    assert np.allclose(excess, [30.0, 10.0, 170.0])
    assert list(excess > limit) == [True, False, False]
