from __future__ import annotations

from collections.abc import Iterator

import pytest
from _guard_support import EchoUpstream, GuardPool
from _support import LiveServer


@pytest.fixture(scope="module")
def server(bundle_repo) -> Iterator[LiveServer]:
    """The default server of a test module: digits/1, open scoring, admin routes off."""
    with LiveServer(repository=bundle_repo, max_delay_ms=5) as s:
        yield s


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    """An echo upstream in its own process, for the guard tests."""
    with EchoUpstream() as u:
        yield u


@pytest.fixture(scope="module")
def guard(bundle_repo, upstream) -> Iterator[GuardPool]:
    """Guards in front of `upstream`, one per set of settings, started on first use."""
    with GuardPool(repository=bundle_repo, upstream=upstream.url) as pool:
        yield pool
