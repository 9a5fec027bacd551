"""Shared test fixtures: where the workplace's real data lives, skipping cleanly without it."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# A real RTSP server in a subprocess, for the video source tests; real NATS servers for the fleet tests.
pytest_plugins = ["tests.rtsp_fixtures", "tests.nats_cluster"]

# ../shared beside the checkout holds real videos, datasets and torchvision goldens; it is not
# ours to commit, so every test that needs it skips when it is absent.
SHARED = Path(os.environ.get("MASKSTREAM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (real data from ../shared is not shipped with the project)")
    return path


@pytest.fixture(scope="session")
def golden_weights():
    """The reference's `golden_weights` module, which rebuilds the goldens' exact weights."""
    path = require(REFERENCE / "golden_weights.py")
    spec = importlib.util.spec_from_file_location("golden_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

