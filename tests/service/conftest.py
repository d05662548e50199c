from __future__ import annotations

from collections.abc import Iterator

import pytest
from _support import LiveServer


@pytest.fixture(scope="module")
def server(bundle_repo) -> Iterator[LiveServer]:
    """The default server of a test module: digits/1, open scoring, admin routes off."""
    with LiveServer(repository=bundle_repo, max_delay_ms=5) as s:
        yield s
