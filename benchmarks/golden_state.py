"""The parity goldens' weights for the benchmarks: ../shared/reference/golden_weights.py rebuilds the
exact weights torchvision's goldens used (deterministic, torchvision-initialised scales), so a
benchmark runs realistic activations without a checkpoint file. ../shared is not ours to ship:
without it (or $MASKSTREAM_SHARED) the benchmarks fall back to the model's own seeded init."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SHARED = Path(os.environ.get("MASKSTREAM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MANIFESTS = {"v1": "torchvision_maskrcnn_resnet50_fpn.json", "v2": "torchvision_maskrcnn_resnet50_fpn_v2.json"}


def golden_state(variant: str) -> dict[str, torch.Tensor] | None:
    """The goldens' state dict of `variant`, or None (no goldens for it, or no ../shared)."""
    path = SHARED / "reference" / "golden_weights.py"
    if variant not in MANIFESTS or not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("golden_weights", path)
    assert spec is not None and spec.loader is not None
    gw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gw)
    return gw.make_state_dict(gw.load_manifest(SHARED / "reference" / MANIFESTS[variant]), seed=0)
