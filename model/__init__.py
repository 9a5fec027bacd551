"""Mask R-CNN in plain PyTorch, with torchvision-compatible weights and a static export graph.

`MaskRCNN` and `build` load torch when first used, not when the package is imported: the
pipeline's torch-free stages import torch-free modules of this package (model.contract,
model.config, model.coco), and importing them must not bring torch into those processes."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from maskstream.model.config import ModelConfig, default_config

if TYPE_CHECKING:
    from maskstream.model.mask_rcnn import MaskRCNN, build

__all__ = ["MaskRCNN", "ModelConfig", "build", "default_config"]


def __getattr__(name: str) -> Any:
    if name in ("MaskRCNN", "build"):
        from maskstream.model import mask_rcnn

        return getattr(mask_rcnn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
