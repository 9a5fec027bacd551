"""Box arithmetic shared by the RPN, the RoI heads and their losses.

Boxes are (x1, y1, x2, y2) in pixels. Formulas and operation order follow torchvision's
`_utils.BoxCoder` and `ops.boxes` so that float32 results agree bit for bit where possible.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest log-scale a box may grow by in one decode step, as in torchvision.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) offsets from reference boxes and back."""

    def __init__(self, weights: tuple[float, float, float, float]):
        self.weights = weights

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        """targets, references: [N, 4] -> deltas [N, 4]."""
        wx, wy, ww, wh = self.weights
        ref_w = references[:, 2] - references[:, 0]
        ref_h = references[:, 3] - references[:, 1]
        ref_cx = references[:, 0] + 0.5 * ref_w
        ref_cy = references[:, 1] + 0.5 * ref_h
        gt_w = targets[:, 2] - targets[:, 0]
        gt_h = targets[:, 3] - targets[:, 1]
        gt_cx = targets[:, 0] + 0.5 * gt_w
        gt_cy = targets[:, 1] + 0.5 * gt_h
        return torch.stack(
            (
                wx * (gt_cx - ref_cx) / ref_w,
                wy * (gt_cy - ref_cy) / ref_h,
                ww * torch.log(gt_w / ref_w),
                wh * torch.log(gt_h / ref_h),
            ),
            dim=1,
        )

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        """deltas [..., 4k], references [..., 4] -> boxes [..., k, 4].

        The leading dimensions are shared, so one call decodes a whole batch ([B, N, 4]) or
        every class of every proposal ([N, C*4] -> [N, C, 4]).
        """
        references = references.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (references[..., 2] - references[..., 0]).unsqueeze(-1)
        heights = (references[..., 3] - references[..., 1]).unsqueeze(-1)
        ctr_x = references[..., 0].unsqueeze(-1) + 0.5 * widths
        ctr_y = references[..., 1].unsqueeze(-1) + 0.5 * heights
        dx = deltas[..., 0::4] / wx
        dy = deltas[..., 1::4] / wy
        dw = torch.clamp(deltas[..., 2::4] / ww, max=BBOX_XFORM_CLIP)
        dh = torch.clamp(deltas[..., 3::4] / wh, max=BBOX_XFORM_CLIP)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
            dim=-1,
        )


def clip_boxes(boxes: Tensor, height: Tensor | int, width: Tensor | int) -> Tensor:
    """Clamp [..., 4] boxes into [0, width] x [0, height].

    height/width may be ints or tensors broadcastable to boxes[..., 0] (per-image sizes in the
    static graph).
    """
    x = boxes[..., 0::2].clamp(min=0)
    y = boxes[..., 1::2].clamp(min=0)
    if isinstance(width, Tensor) and isinstance(height, Tensor):
        x = torch.minimum(x, width.to(boxes.dtype).unsqueeze(-1))
        y = torch.minimum(y, height.to(boxes.dtype).unsqueeze(-1))
    else:
        x = x.clamp(max=width)
        y = y.clamp(max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def is_large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """[..., 4] -> bool [...]: both sides at least min_size (torchvision's remove_small_boxes)."""
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return (ws >= min_size) & (hs >= min_size)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """[N, 4], [M, 4] -> IoU [N, M]."""
    area_a, area_b = box_area(a), box_area(b)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)  # [N, M, 2]
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)
