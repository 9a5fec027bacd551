"""Model configuration: one frozen dataclass tree, mirrored key for key by configs/model*.yaml.

Defaults are torchvision's, so `build("v1")` behaves like `maskrcnn_resnet50_fpn()` and a
torchvision checkpoint loads into it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Variant = Literal["v1", "v2", "lite"]


@dataclass(frozen=True)
class TransformConfig:
    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32


@dataclass(frozen=True)
class RPNConfig:
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one size per level, P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    score_thresh: float = 0.0
    min_size: float = 1e-3


@dataclass(frozen=True)
class RoIHeadsConfig:
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    min_box_size: float = 1e-2


@dataclass(frozen=True)
class StaticGraphConfig:
    """Fixed shapes of the TensorRT-style inference graph."""

    batch: int = 1
    height: int = 800
    width: int = 1344
    detections: int = 100  # K: padded number of detections per image


@dataclass(frozen=True)
class ModelConfig:
    variant: Variant = "v1"
    num_classes: int = 91  # including background, torchvision's COCO convention
    class_names: tuple[str, ...] = ()  # optional, index = label; empty means "class_<i>"
    # "frozen" = torchvision's FrozenBatchNorm2d (what its pretrained v1 backbone uses);
    # "batch" = nn.BatchNorm2d. v2 always uses BatchNorm2d, as torchvision does.
    backbone_norm: Literal["frozen", "batch"] = "frozen"
    trainable_backbone_layers: int = 3
    fpn_channels: int = 256  # torchvision's R50-FPN; the lite variant uses fewer
    box_representation: int = 1024  # width of the box head's fully connected layer(s)
    transform: TransformConfig = field(default_factory=TransformConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    static: StaticGraphConfig = field(default_factory=StaticGraphConfig)


def default_config(variant: Variant) -> ModelConfig:
    if variant in ("v1", "v2"):
        return ModelConfig(variant=variant)
    if variant == "lite":
        # A CPU budget: narrower pyramid and heads, 512-pixel short side.
        return ModelConfig(
            variant="lite",
            fpn_channels=128,
            box_representation=512,
            transform=TransformConfig(min_size=512, max_size=853),
            static=StaticGraphConfig(height=512, width=864),
        )
    raise ValueError(f"variant: expected one of 'v1', 'v2', 'lite', got {variant!r}")
