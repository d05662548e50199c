"""The self-check's relative equivariance error (service/runtime.py): near-zero outputs are not a violation."""

from __future__ import annotations

import numpy as np

from service.runtime import EQUIVARIANCE_TOL, relative_error


def test_float_noise_on_outputs_that_are_zero_is_not_an_equivariance_error():
    # the level output of a bundle trained on upright digits, as measured on its probes before and after a 90° turn
    base = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0861626e-07]], np.float32)
    turned = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.7881393e-07]], np.float32)
    assert relative_error(turned, base) <= EQUIVARIANCE_TOL


def test_a_real_violation_is_still_one():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 2))
    assert relative_error(base + 1e-7, base) <= EQUIVARIANCE_TOL
    assert relative_error(base + 0.01 * rng.normal(size=(4, 2)), base) > EQUIVARIANCE_TOL
    small = 1e-3 * rng.normal(size=(4, 2))  # small but not zero: relative, as before
    assert relative_error(small * 1.1, small) > EQUIVARIANCE_TOL
    assert relative_error(np.zeros(0), np.zeros(0)) == 0.0
