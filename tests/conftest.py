"""Shared test fixtures. Constants and builders that several test modules use live in helper
modules beside this one (shared_data, tiny_models, pipeline_runs, op_cases, make_detections):
a test module never imports another test module, and no two fixtures share a name
(tests/test_layout.py checks both)."""
from __future__ import annotations

import importlib.util

import pytest

from tests.shared_data import REFERENCE, require

# A real RTSP server in a subprocess, for the video source tests; real NATS servers for the fleet tests;
# a loopback HTTP model mirror for the named-model tests.
pytest_plugins = ["tests.rtsp_fixtures", "tests.nats_cluster", "tests.model_mirror"]


@pytest.fixture(scope="session")
def golden_weights():
    """The reference's `golden_weights` module, which rebuilds the goldens' exact weights."""
    path = require(REFERENCE / "golden_weights.py")
    spec = importlib.util.spec_from_file_location("golden_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
