"""Mask R-CNN in plain PyTorch, with torchvision-compatible weights and a static export graph."""
from maskstream.model.config import ModelConfig
from maskstream.model.mask_rcnn import MaskRCNN, build, default_config

__all__ = ["MaskRCNN", "ModelConfig", "build", "default_config"]
