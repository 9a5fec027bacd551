"""The eager model resizes every input size exactly as torchvision 0.28 does.

torchvision's formula is written out here, not imported (torchvision cannot run on these
machines): GeneralizedRCNNTransform._resize_image_and_masks, eager branch, takes
`min(self_min_size / min(h, w), self_max_size / max(h, w))` in Python floats, and
F.interpolate(scale_factor=s, recompute_scale_factor=True) makes each side floor(side * s).
One rounding step in float32 parts from it on sizes such as 427 (a common COCO height).
"""
from __future__ import annotations

import math

import pytest
import torch
from maskstream.model.config import TransformConfig
from maskstream.model.transform import resize_image, resized_hw, scale_boxes

SIZES = range(100, 1401)


def torchvision_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    scale_factor = min(min_size / min(h, w), max_size / max(h, w))
    return math.floor(h * scale_factor), math.floor(w * scale_factor)


@pytest.mark.parametrize("min_size,max_size", [(800, 1333), (416, 704), (320, 576)])
def test_every_height_and_width_from_100_to_1400(min_size, max_size):
    cfg = TransformConfig(min_size=min_size, max_size=max_size)
    wrong = []
    for h in SIZES:
        for w in SIZES:
            ours, theirs = resized_hw((h, w), cfg)[1], torchvision_size(h, w, min_size, max_size)
            if ours != theirs:
                wrong.append((h, w, ours, theirs))
    assert not wrong, f"{len(wrong)} sizes differ from torchvision's, first (h, w, ours, theirs): {wrong[:5]}"


def test_the_sweep_reaches_both_roundings():
    """A float32 scale gives other sizes on part of the sweep: the sweep can tell them apart."""
    cfg = TransformConfig()
    float32_sizes = 0
    for h in SIZES:
        w = 640
        side = torch.tensor((h, w), dtype=torch.float32)
        scale32 = torch.min(cfg.min_size / side.min(), cfg.max_size / side.max()).item()
        if (math.floor(h * scale32), math.floor(w * scale32)) != torchvision_size(h, w, 800, 1333):
            float32_sizes += 1
    assert float32_sizes > 0
    assert resized_hw((427, 640), cfg)[1] == (800, 1199)  # 799 rows with a float32 scale


@pytest.mark.parametrize("hw", [(427, 640), (480, 640), (333, 500), (1080, 1920), (100, 1400), (1399, 101)])
def test_the_resized_image_has_the_size_it_promises(hw):
    cfg = TransformConfig()
    image = torch.zeros((3, *hw))
    assert tuple(resize_image(image, cfg).shape[-2:]) == resized_hw(hw, cfg)[1]


def test_boxes_scale_back_with_torchvision_float32_ratios():
    """torchvision's resize_boxes: float32 per-axis ratios of the integer sizes."""
    boxes = torch.tensor([[10.5, 20.25, 300.75, 400.5]])
    to_hw, from_hw = (427, 640), (800, 1199)
    ratio_h = torch.tensor(427, dtype=torch.float32) / torch.tensor(800, dtype=torch.float32)
    ratio_w = torch.tensor(640, dtype=torch.float32) / torch.tensor(1199, dtype=torch.float32)
    expected = boxes * torch.stack([ratio_w, ratio_h, ratio_w, ratio_h])
    assert torch.equal(scale_boxes(boxes, from_hw, to_hw), expected)
