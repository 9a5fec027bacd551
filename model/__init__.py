"""Mask R-CNN in plain PyTorch, with torchvision-compatible weights and a static export graph."""
from model.config import ModelConfig
from model.mask_rcnn import MaskRCNN, build, default_config

__all__ = ["MaskRCNN", "ModelConfig", "build", "default_config"]
