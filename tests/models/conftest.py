from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def test_bundle(bundle_repo) -> Path:
    """The shared untrained (but exactly equivariant and calibrated) bundle, written by the real export path."""
    return bundle_repo / "digits" / "1"


@pytest.fixture(scope="session")
def digits():
    """Real MNIST test-split digits at model size: (images [N,1,29,29] in [0,1], labels)."""
    from models.datasets import load_source, load_spec

    src = load_source(load_spec("mnist"))
    return src.test.images[:64], src.test.labels[:64]
