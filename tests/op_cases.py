"""Random inputs for the custom ops' tests, shared by the CPU op tests (test_nms, test_roi_align)
and the Triton kernel tests that check against those ops (test_nms_triton, test_roi_align_triton)."""
from __future__ import annotations

import math

import torch


def clustered(gen: torch.Generator, n: int, classes: int, dtype=torch.float32):
    """Boxes around a few centres (so suppression happens), scores on a coarse grid (so ties
    happen), a few zero-size, inverted and NaN boxes."""
    centres = torch.rand(6, 2, generator=gen) * 100
    centre = centres[torch.randint(0, 6, (n,), generator=gen)] + torch.randn(n, 2, generator=gen) * 3
    size = torch.rand(n, 2, generator=gen) * 20 + 8
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    odd = torch.rand(n, generator=gen)
    boxes[odd < 0.05, 2:] = boxes[odd < 0.05, :2]  # zero area
    boxes[(odd >= 0.05) & (odd < 0.08), 2] -= 40  # x2 < x1: negative area
    boxes[(odd >= 0.08) & (odd < 0.1), 0] = float("nan")  # NaN area: IoU NaN, suppresses nothing
    scores = torch.randint(0, 25, (n,), generator=gen).float() / 25
    labels = torch.randint(0, classes, (n,), generator=gen)
    return boxes.to(dtype), scores, labels


def pyramid(gen: torch.Generator, b: int, c: int, h: int, w: int, dtype=torch.float32) -> list[torch.Tensor]:
    """P2..P5 for an h x w image (h, w divisible by 32), standard normal features."""
    return [torch.randn(b, c, h >> (2 + lvl), w >> (2 + lvl), generator=gen).to(dtype) for lvl in range(4)]


def special_boxes(h: int, w: int) -> torch.Tensor:
    """Borders, outside, negative coordinates and degenerate boxes."""
    return torch.tensor([
        [0, 0, w, h],                      # the whole image (a top-level box for small images)
        [w - 10, h - 12, w + 30, h + 25],  # over the bottom-right border
        [-30, -20, 25, 18],                # negative coordinates, over the top-left border
        [w + 40, h + 40, w + 90, h + 120], # fully outside, beyond the bottom-right
        [-120, -90, -70, -40],             # fully outside, top-left
        [10.5, 7.25, 10.5, 40.0],          # zero width
        [5.0, 5.0, 5.0, 5.0],              # a point
        [40.0, 10.0, 20.0, 50.0],          # x2 < x1 only: negative area, NaN level
        [40.0, 50.0, 20.0, 10.0],          # x2 < x1 and y2 < y1: positive area
        [-600, -500, w + 700, h + 650],    # enormous
    ], dtype=torch.float32)


def random_boxes(gen: torch.Generator, b: int, r: int, h: int, w: int) -> torch.Tensor:
    """[b, r, 4]: log-uniform sizes 2..1200 px (every level), centres up to 20% past the borders,
    with some of `special_boxes` mixed in."""
    size = torch.exp(torch.empty(b, r, 2).uniform_(math.log(2), math.log(1200), generator=gen))
    centre = (torch.rand(b, r, 2, generator=gen) * 1.4 - 0.2) * torch.tensor([w, h])
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    special = special_boxes(h, w)
    pick = torch.rand(b, r, generator=gen) < 0.3
    which = torch.randint(0, len(special), (b, r), generator=gen)
    return torch.where(pick[..., None], special[which], boxes)
