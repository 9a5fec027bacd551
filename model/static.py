"""The static-shape inference graph: what torch.export captures and TensorRT compiles.

    images      uint8 [B, 3, H, W]  RGB frames, already resized and padded by the preprocess
                                     stage (B, H, W fixed by StaticGraphConfig)
    image_sizes int64 [B, 2]        (h, w) of the valid region of each frame; boxes are clipped
                                     to it, as the eager path clips to the resized image
 -> num_detections int64 [B], boxes float32 [B, K, 4] (input pixels), scores [B, K],
    labels int64 [B, K], mask_probs float32 [B, K, 28, 28]; rows past num_detections are zero.

Normalisation is inside the graph. The preprocess should pad with the mean colour
(`pad_value()`, model.contract.pad_rgb), which normalises to ~0 like torchvision's zero padding
after normalisation.
"""
from __future__ import annotations

import torch
from maskstream.model.config import StaticGraphConfig
from maskstream.model.contract import PRECISIONS, Precision, pad_rgb
from maskstream.model.mask_rcnn import MaskRCNN
from torch import Tensor, nn

OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels", "mask_probs")

# "fp16" casts to and from float16 in the graph itself, so the TensorRT engine (compiled strongly
# typed: what runs in float16 is what the graph's dtypes say) and the torch runner agree:
# - the backbone + FPN (most of the FLOPs) run in float16 and their features are cast back to
#   float32, so the RPN, the box head, NMS and RoIAlign stay float32: boxes are decoded and
#   compared in float32 (an fp16 box coordinate near 1000 px is only good to 0.5 px);
# - the mask head + predictor run in float16 too: the RoIAligned float32 features are cast to
#   float16 at the mask head's input, and the logits of each box's own class back to float32
#   before the sigmoid, so mask_probs are float32. These 4 + 2 convs on 14x14/28x28 run once per
#   detection, a share of the forward that grows with K; in float16 they run on tensor cores. A
#   mask probability is only thresholded at 0.5 when pasted, so float16's ~1e-3 is far below
#   what changes a pixel.
# Boxes, scores and labels do not depend on the mask branch: they are those of a graph with only
# the backbone in float16, bit for bit. (Precision and PRECISIONS live in model.contract, which
# the torch-free stages import.)
__all__ = ["OUTPUT_NAMES", "PRECISIONS", "HalfBackbone", "HalfMaskHead", "Precision", "StaticMaskRCNN", "export",
           "pad_value", "with_precision"]


class HalfBackbone(nn.Module):
    """Backbone + FPN in float16, features handed on in float32 (the graph's explicit casts)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner = backbone.half()

    def forward(self, x: Tensor) -> list[Tensor]:
        return [f.float() for f in self.inner(x.half())]


class HalfMaskHead(nn.Module):
    """Mask head in float16: the RoIAligned float32 features cast in, float16 handed on to the
    mask predictor, which is in float16 itself and needs no cast: its float16 logits go on to
    `RoIHeads.mask_probs`, which picks each box's class first and casts only that [B, R, 28, 28]
    slice to float32 for the sigmoid (casting all 91 classes' logits would move 91x the bytes)."""

    def __init__(self, mask_head: nn.Module):
        super().__init__()
        self.inner = mask_head.half()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.half())


def with_precision(net: MaskRCNN, precision: str) -> MaskRCNN:
    """`net` with `precision`'s casts applied in place (fp32: unchanged), for inference. Fold
    norms first (model.fuse.fold_batch_norms), so their scales merge in float32 and round once."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16":
        # Each wrapper keeps its module's call signature and attribute name (stage names in
        # pipeline/bench/runner_profile.py); model.runners tells fp16 by the HalfBackbone.
        net.backbone = HalfBackbone(net.backbone)  # type: ignore[assignment]
        heads = net.roi_heads
        heads.mask_head = HalfMaskHead(heads.mask_head)
        heads.mask_predictor.half()  # float16 in from the head, float16 logits out: no cast of its own
    return net


class StaticMaskRCNN(nn.Module):
    mean: Tensor
    std: Tensor

    def __init__(self, model: MaskRCNN, shape: StaticGraphConfig | None = None):
        super().__init__()
        self.model = model
        cfg = model.cfg
        shape = shape or cfg.static
        self.shape = (shape.batch, 3, shape.height, shape.width)
        divisor = cfg.transform.size_divisible
        if shape.height % divisor or shape.width % divisor:
            raise ValueError(
                f"static.height/width must be multiples of transform.size_divisible={divisor}, "
                f"got {shape.height}x{shape.width}"
            )
        if shape.detections != model.roi_heads.detections_per_img:
            raise ValueError(
                f"static.detections={shape.detections} must equal roi_heads.detections_per_img="
                f"{model.roi_heads.detections_per_img} (K is fixed in the graph)"
            )
        # Constants, not parameters: they belong to the graph, not to the checkpoint.
        mean = torch.tensor(cfg.transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg.transform.image_std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def example_inputs(self, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        b, _, h, w = self.shape
        images = torch.zeros(self.shape, dtype=torch.uint8, device=device)
        sizes = torch.tensor([[h, w]] * b, dtype=torch.int64, device=device)
        return images, sizes

    def forward(self, images: Tensor, image_sizes: Tensor) -> dict[str, Tensor]:
        if images.dtype != torch.uint8 or tuple(images.shape) != self.shape:
            raise ValueError(
                f"images: expected uint8 {list(self.shape)} (B, 3, H, W from the static config), "
                f"got {images.dtype} {list(images.shape)}"
            )
        if tuple(image_sizes.shape) != (self.shape[0], 2):
            raise ValueError(
                f"image_sizes: expected [{self.shape[0]}, 2] (h, w per frame), got {list(image_sizes.shape)}"
            )
        m = self.model
        # Same arithmetic as the eager path: uint8 / 255 then (x - mean) / std, folded.
        x = (images.float() - self.mean) / self.std
        features = m.features(x)
        proposals, num_proposals, _ = m.rpn(features, tuple(self.shape[-2:]), image_sizes)
        det = m.roi_heads.detect(features, proposals, num_proposals, image_sizes)
        probs = m.roi_heads.mask_probs(features, det["boxes"], det["labels"])
        filled = torch.arange(probs.shape[1], device=probs.device)[None, :] < det["num_detections"][:, None]
        return {
            "num_detections": det["num_detections"],
            "boxes": det["boxes"],
            "scores": det["scores"],
            "labels": det["labels"],
            "mask_probs": torch.where(filled[..., None, None], probs, 0.0),
        }


def pad_value(model: MaskRCNN) -> tuple[int, int, int]:
    """uint8 RGB that normalises to (about) zero: the colour to pad frames with."""
    return pad_rgb(model.cfg.transform.image_mean)


def export(static: StaticMaskRCNN, device: str | torch.device = "cpu") -> torch.export.ExportedProgram:
    """torch.export with strict shapes; raises if anything would break the graph."""
    static = static.eval()
    with torch.no_grad():
        return torch.export.export(static, static.example_inputs(device), strict=False)
