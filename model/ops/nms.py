"""Class-aware NMS with a fixed-size padded output: `torch.ops.maskstream.batched_nms_padded`.

Semantics are torchvision's `batched_nms` on its "vanilla" path (exact greedy NMS inside each
class, no coordinate-offset trick) with the IoU of its CPU `nms` kernel, computed in the boxes'
dtype:
- candidates: `scores > score_threshold` (evaluated by torch, i.e. in the scores' dtype, as
  torchvision's `scores > self.score_thresh` is); NaN scores are never candidates;
- within a class, greedy in descending score order, ties broken by lower index (stable sort);
  a box is dropped when its IoU with an already kept box of its class is `> iou_threshold`;
- the IoU is `inter / (area_i + area_j - inter)`, so 0/0 (two identical empty boxes) is NaN and
  suppresses nothing, and neither does a box with a NaN coordinate (NaN area);
- output: kept indices of all classes merged in descending score order (stable), cut to
  `max_output` and padded with -1, plus the number of valid entries.

How it is fast without a compiled kernel: a box's fate depends only on higher-scored boxes of its
class, so candidates are visited in one global score order, a chunk at a time. Each chunk is first
tested against every box kept so far (one vectorised IoU block), then the few survivors are
resolved greedily among themselves. The walk stops as soon as `max_output` boxes are kept, since
nothing later can enter the output; with max_output 100 out of 90,000 candidates it looks at a
few hundred.

On CUDA, float32 boxes take the same walk as one Triton program per image
(model/ops/nms_triton.py), since each chunk here asks the host which rows survive.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import torch
from maskstream.model.ops.iou_threshold import largest_not_above
from torch import Tensor

# Rows per chunk. Short chunks waste little work past the max_output-th kept box (the RPN and
# box-head cases measured fastest at 128); but when a chunk keeps under a quarter of its rows the
# walk is in heavy suppression and may be long, so the chunk doubles, up to MAX_CHUNK, to keep
# the Python steps few (90 classes of identical boxes: 290 ms at a fixed 128, 60 ms growing).
CHUNK = 128
MAX_CHUNK = 2048


def _check_inputs(boxes: Tensor, scores: Tensor, classes: Tensor, batched: bool) -> None:
    lead = "[B, N" if batched else "[N"
    if not isinstance(boxes, Tensor) or boxes.dim() != (3 if batched else 2) or boxes.shape[-1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be {lead}, 4] (x1, y1, x2, y2), got {got}")
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be a floating point tensor, got {boxes.dtype}")
    for name, t in (("scores", scores), ("classes", classes)):
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(boxes.shape[:-1]):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be {lead}] matching boxes {tuple(boxes.shape)}, got {got}")
        if t.device != boxes.device:
            raise ValueError(f"{name} is on {t.device} but boxes are on {boxes.device}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating point tensor, got {scores.dtype}")
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise TypeError(f"classes must be an integer tensor, got {classes.dtype}")


def _check_padded_inputs(boxes: Tensor, scores: Tensor, classes: Tensor, max_output: int) -> None:
    """`batched_nms_padded`'s inputs, checked alike by its CPU, CUDA and fake kernels."""
    _check_inputs(boxes, scores, classes, batched=True)
    if max_output < 0:
        raise ValueError(f"max_output must be >= 0, got {max_output}")


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pairwise_iou(a: Tensor, area_a: Tensor, b: Tensor, area_b: Tensor) -> Tensor:
    """IoU [K, T] of a [K, 4] with b [T, 4], exactly the nms kernel's arithmetic in their dtype."""
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp_(min=0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp_(min=0)
    inter = w.mul_(h)  # [K, T]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _greedy(suppresses: np.ndarray) -> list[int]:
    """Greedy NMS over rows already in score order; suppresses[i, j] (j > i) says i drops j."""
    removed = np.zeros(suppresses.shape[0], dtype=bool)
    kept = []
    for i in range(suppresses.shape[0]):
        if not removed[i]:
            kept.append(i)
            removed |= suppresses[i]
    return kept


def _walk(boxes: Tensor, areas: Tensor, classes: Tensor, threshold: Tensor, limit: int) -> Tensor:
    """Greedy NMS over candidates already in descending score order -> kept positions [M], M <= limit."""
    kept: list[Tensor] = []
    kept_boxes, kept_areas, kept_classes = boxes[:0], areas[:0], classes[:0]
    total = 0
    start, chunk = 0, CHUNK
    while start < boxes.shape[0] and total < limit:
        stop = min(start + chunk, boxes.shape[0])
        cb, ca, cc = boxes[start:stop], areas[start:stop], classes[start:stop]
        alive = torch.arange(stop - start, device=boxes.device)
        if total:  # anything overlapping a box kept in an earlier chunk is gone
            hit = _pairwise_iou(kept_boxes, kept_areas, cb, ca) > threshold  # [K, T]
            alive = alive[~(hit & (kept_classes[:, None] == cc)).any(0)]
            cb, ca, cc = cb[alive], ca[alive], cc[alive]
        # Survivors are still in score order; the upper triangle lets each see only those before it.
        hit = (_pairwise_iou(cb, ca, cb, ca) > threshold) & (cc[:, None] == cc[None, :])
        local = torch.tensor(_greedy(torch.triu(hit, diagonal=1).cpu().numpy()), dtype=torch.int64)
        local = local.to(boxes.device)
        kept.append(alive[local] + start)
        kept_boxes = torch.cat([kept_boxes, cb[local]])
        kept_areas = torch.cat([kept_areas, ca[local]])
        kept_classes = torch.cat([kept_classes, cc[local]])
        total += local.numel()
        if 4 * local.numel() < stop - start:
            chunk = min(2 * chunk, MAX_CHUNK)
        start = stop
    positions = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64, device=boxes.device)
    return positions[:limit]


def _nms_one_image(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    iou_threshold: float,
    score_threshold: float | None,
    max_output: int | None,
) -> Tensor:
    """Kept indices [M] int64 into boxes [N, 4], in descending score order, M <= max_output."""
    if score_threshold is None:
        order = torch.sort(scores, descending=True, stable=True).indices
    else:
        candidates = torch.nonzero(scores > score_threshold).squeeze(1)
        order = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
    boxes, classes = boxes[order], classes[order]
    areas = _area(boxes)
    threshold = largest_not_above(iou_threshold, boxes.dtype).to(boxes.device)
    if max_output is not None:
        # One walk in global score order, so it can stop once max_output boxes are kept.
        return order[_walk(boxes, areas, classes, threshold, max_output)]
    # Without a limit nothing stops early; one walk per class then spares the IoU blocks between
    # classes. Positions in the global order, sorted, are the merged descending-score order.
    parts = []
    for c in torch.unique(classes):
        members = torch.nonzero(classes == c).squeeze(1)
        parts.append(members[_walk(boxes[members], areas[members], classes[members], threshold, members.numel())])
    positions = torch.sort(torch.cat(parts)).values if parts else order[:0]
    return order[positions]


@torch.library.custom_op("maskstream::batched_nms_padded", mutates_args=())
def _batched_nms_padded_op(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_output: int,
) -> tuple[Tensor, Tensor]:
    _check_padded_inputs(boxes, scores, classes, max_output)
    keep = torch.full((boxes.shape[0], max_output), -1, dtype=torch.int64, device=boxes.device)
    num_kept = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
    for i in range(boxes.shape[0]):
        kept = _nms_one_image(boxes[i], scores[i], classes[i], iou_threshold, score_threshold, max_output)
        keep[i, : kept.numel()] = kept
        num_kept[i] = kept.numel()
    return keep, num_kept


@_batched_nms_padded_op.register_fake
def _(boxes, scores, classes, iou_threshold, score_threshold, max_output):
    _check_padded_inputs(boxes, scores, classes, max_output)
    b = boxes.shape[0]
    return boxes.new_empty((b, max_output), dtype=torch.int64), boxes.new_empty((b,), dtype=torch.int64)


@_batched_nms_padded_op.register_kernel("cuda")
def _(boxes, scores, classes, iou_threshold, score_threshold, max_output):
    # On CUDA the walk is the Triton kernel of model/ops/nms_triton.py: no host synchronisation,
    # so the static graph can be captured in a CUDA graph. Imported here, not at the top: triton
    # is slow to import and absent from CPU-only installs. Other box dtypes keep the torch walk.
    args = (boxes, scores, classes, iou_threshold, score_threshold, max_output)
    _check_padded_inputs(boxes, scores, classes, max_output)
    if boxes.dtype == torch.float32 and importlib.util.find_spec("triton") is not None:
        from maskstream.model.ops.nms_triton import triton_batched_nms_padded

        return triton_batched_nms_padded(*args)
    return _batched_nms_padded_op._init_fn(*args)


def batched_nms_padded(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, score_threshold: float, max_output: int
) -> tuple[Tensor, Tensor]:
    """boxes [B, N, 4], scores [B, N], classes [B, N] -> keep [B, max_output] (-1 padded), num_kept [B]."""
    return torch.ops.maskstream.batched_nms_padded(
        boxes, scores, classes, float(iou_threshold), float(score_threshold), int(max_output)
    )


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's `batched_nms` for the eager path: boxes [N, 4] -> kept indices [M] int64.

    Every box is a candidate, as in torchvision (a NaN score sorts first, as torch.sort puts it).
    """
    _check_inputs(boxes, scores, classes, batched=False)
    return _nms_one_image(boxes, scores, classes, float(iou_threshold), None, None)


def batched_nms_reference(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, score_threshold: float | None = None
) -> list[int]:
    """Slow transcription of torchvision's `_batched_nms_vanilla` + CPU `nms` kernel for one image.

    boxes [N, 4], scores [N], classes [N] -> kept indices in descending score order (stable).
    Candidates are `scores > score_threshold` (all boxes if None). IoU is evaluated one scalar
    operation at a time in the boxes' dtype, then compared with the threshold as a Python float
    (double), as the C++ kernel does.
    """
    _check_inputs(boxes, scores, classes, batched=False)
    # NumPy scalars of the boxes' dtype round after every operation, as the C++ kernel does.
    dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[boxes.dtype]
    box: list[list[Any]] = [[dtype(v) for v in row] for row in boxes.tolist()]
    score = scores.tolist()
    cls = classes.tolist()
    if score_threshold is None:
        candidates = list(range(len(score)))
    else:
        candidates = torch.nonzero(scores > score_threshold).squeeze(1).tolist()

    def rank(i: int) -> tuple:  # torch.sort(descending, stable): NaN first, then high to low, then index
        return (not math.isnan(score[i]), -score[i] if not math.isnan(score[i]) else 0.0, i)

    def iou(i: int, j: int) -> float:
        area_i = (box[i][2] - box[i][0]) * (box[i][3] - box[i][1])
        area_j = (box[j][2] - box[j][0]) * (box[j][3] - box[j][1])
        w = max(dtype(0), min(box[i][2], box[j][2]) - max(box[i][0], box[j][0]))
        h = max(dtype(0), min(box[i][3], box[j][3]) - max(box[i][1], box[j][1]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(inter / (area_i + area_j - inter))

    kept = []
    for c in sorted({cls[i] for i in candidates}):
        order = sorted((i for i in candidates if cls[i] == c), key=rank)
        suppressed = set()
        for pos, i in enumerate(order):
            if i in suppressed:
                continue
            kept.append(i)
            for j in order[pos + 1:]:
                if j not in suppressed and iou(i, j) > iou_threshold:
                    suppressed.add(j)
    return sorted(kept, key=rank)
