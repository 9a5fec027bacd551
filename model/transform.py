"""Eager-path input handling: normalise, resize, pad into a batch; map results back.

The static graph does none of this: it takes frames already resized and padded by the
preprocess stage and normalises inside the graph (see model/static.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from maskstream.model.config import TransformConfig
from torch import Tensor


def check_images(images: list[Tensor]) -> None:
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"images: expected a non-empty list of [3, H, W] float tensors, got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise ValueError(f"images[{i}]: expected a torch.Tensor [3, H, W], got {type(img).__name__}")
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}]: expected shape [3, H, W] (CHW, RGB), got {list(img.shape)}")
        if not img.is_floating_point():
            raise ValueError(
                f"images[{i}]: expected a float tensor with values in [0, 1], got dtype {img.dtype} "
                "(convert uint8 with img.float() / 255)"
            )
        if img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"images[{i}]: empty image of shape {list(img.shape)}")


def resized_hw(hw: Sequence[int], cfg: TransformConfig) -> tuple[float, tuple[int, int]]:
    """Scale so the short side is min_size unless the long side would pass max_size, and the
    size F.interpolate gives for it.

    Python floats, as torchvision's eager GeneralizedRCNNTransform computes it (its float32
    tensor arithmetic is only for scripting and tracing): in float32, 800 / 427 makes a
    427-pixel side 799 pixels instead of 800. interpolate floors size * scale in double.
    """
    h, w = int(hw[0]), int(hw[1])
    scale = min(cfg.min_size / min(h, w), cfg.max_size / max(h, w))
    return scale, (math.floor(h * scale), math.floor(w * scale))


def normalize(image: Tensor, cfg: TransformConfig) -> Tensor:
    mean = torch.as_tensor(cfg.image_mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(cfg.image_std, dtype=image.dtype, device=image.device)
    return (image - mean[:, None, None]) / std[:, None, None]


def resize_image(image: Tensor, cfg: TransformConfig) -> Tensor:
    scale, _ = resized_hw(tuple(image.shape[-2:]), cfg)
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def resize_target(target: dict, from_hw: Sequence[int], to_hw: Sequence[int]) -> dict:
    out = dict(target)
    out["boxes"] = scale_boxes(target["boxes"], from_hw, to_hw)
    if "masks" in target and target["masks"].numel():
        masks = target["masks"][:, None].float()
        out["masks"] = F.interpolate(masks, size=to_hw)[:, 0].to(torch.uint8)  # nearest
    return out


def scale_boxes(boxes: Tensor, from_hw: Sequence[int], to_hw: Sequence[int]) -> Tensor:
    """Map boxes between image sizes (torchvision's resize_boxes: float32 per-axis ratios)."""
    ratio_h = torch.tensor(to_hw[0], dtype=torch.float32) / torch.tensor(from_hw[0], dtype=torch.float32)
    ratio_w = torch.tensor(to_hw[1], dtype=torch.float32) / torch.tensor(from_hw[1], dtype=torch.float32)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=-1)


def batch_images(images: list[Tensor], size_divisible: int) -> Tensor:
    """Zero-pad (after normalisation, so padding is the mean colour) to a common size."""
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    h = int(math.ceil(h / size_divisible) * size_divisible)
    w = int(math.ceil(w / size_divisible) * size_divisible)
    batch = images[0].new_zeros((len(images), 3, h, w))
    for img, slot in zip(images, batch):
        slot[:, : img.shape[1], : img.shape[2]].copy_(img)
    return batch


def prepare(
    images: list[Tensor], targets: list[dict] | None, cfg: TransformConfig
) -> tuple[Tensor, Tensor, list[dict] | None]:
    """list of [3, H, W] in [0, 1] -> padded batch [B, 3, Hp, Wp], image_sizes [B, 2], targets."""
    check_images(images)
    resized, sizes, new_targets = [], [], []
    for i, img in enumerate(images):
        out = resize_image(normalize(img, cfg), cfg)
        resized.append(out)
        sizes.append(out.shape[-2:])
        if targets is not None:
            new_targets.append(resize_target(targets[i], tuple(img.shape[-2:]), tuple(out.shape[-2:])))
    image_sizes = torch.tensor([list(s) for s in sizes], dtype=torch.int64, device=images[0].device)
    return batch_images(resized, cfg.size_divisible), image_sizes, (new_targets if targets is not None else None)
