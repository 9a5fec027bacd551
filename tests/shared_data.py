"""Where the workplace's real data lives (../shared beside the checkout, or $MASKSTREAM_SHARED),
and `require`, which skips a test cleanly without it. A helper module, not a conftest: test
modules import it like any other, and conftest.py builds its fixtures on it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared holds real videos, datasets and torchvision goldens; it is not ours to commit, so
# every test that needs it skips when it is absent.
SHARED = Path(os.environ.get("MASKSTREAM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (real data from ../shared is not shipped with the project)")
    return path
