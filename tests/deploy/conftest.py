"""tests/deploy reuses the service tests' LiveServer and image helpers (tests/service/_support.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
