"""`maskstream::batched_nms_padded` on the GPU without a host round trip: sort in torch, walk in Triton.

The CPU op (model/ops/nms.py) walks the candidates in Python and asks the host which chunk rows
survive; on CUDA every such question is a device-to-host synchronisation, which is slow and makes
the forward impossible to capture in a CUDA graph. Here the same exact greedy walk runs on the
device: torch sorts the candidates (fixed shapes, no synchronisation), then one Triton program per
image walks them in score order, a chunk of CHUNK rows at a time:

  1. the chunk is tested against every box kept so far, KEPT_BLOCK kept boxes per IoU block;
  2. its survivors are resolved among themselves: take the first survivor (it is kept), drop the
     survivors its IoU suppresses, repeat. So a chunk costs one step per kept box, plus one, and
     the walk stops as soon as `max_output` boxes are kept.

Semantics are the CPU op's, bit for bit (the tests compare indices exactly): candidates are
`scores > score_threshold` as torch evaluates it; order is descending score, ties to the lower
index; the IoU is `inter / (area_i + area_j - inter)` in float32 with torch's NaN propagation
(NaN IoU suppresses nothing), rounded-to-nearest division and no fused multiply-adds; a box is
dropped when its IoU with a kept box of its class is `> iou_threshold` (compared as the largest
float32 not above it, as the CPU op does). Float32 boxes only: other dtypes stay with the CPU code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from maskstream.model.ops.iou_threshold import largest_not_above
from torch import Tensor

# Rows per chunk and kept boxes per IoU block: a [KEPT_BLOCK, CHUNK] block is 16k lanes (16 per
# thread at 4 warps), and a chunk of 128 is the CPU walk's measured sweet spot as well.
CHUNK = 128
KEPT_BLOCK = 128
NUM_WARPS = 4
# Bit-exact float32 steps, as the CPU op and the interpreter round them (see the module docstring).
ENABLE_FP_FUSION = False


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _iou(ax1, ay1, ax2, ay2, a_area, bx1, by1, bx2, by2, b_area):
    # torch.minimum/maximum and clamp propagate NaN; the GPU's min/max instructions would not.
    w = _max_nan(_min_nan(ax2, bx2) - _max_nan(ax1, bx1), 0.0)
    h = _max_nan(_min_nan(ay2, by2) - _max_nan(ay1, by1), 0.0)
    inter = w * h
    return tl.div_rn(inter, (a_area + b_area) - inter)


@triton.jit
def _load_box(ptr, index, STRIDE: tl.constexpr, mask):
    """x1, y1, x2, y2 of the boxes at `index` in rows of STRIDE floats (0 where masked off)."""
    x1 = tl.load(ptr + index * STRIDE + 0, mask=mask, other=0.0)
    y1 = tl.load(ptr + index * STRIDE + 1, mask=mask, other=0.0)
    x2 = tl.load(ptr + index * STRIDE + 2, mask=mask, other=0.0)
    y2 = tl.load(ptr + index * STRIDE + 3, mask=mask, other=0.0)
    return x1, y1, x2, y2


@triton.jit
def nms_walk_kernel(
    boxes_ptr,  # float32 [B, N, 4], candidates first, in score order
    areas_ptr,  # float32 [B, N]
    classes_ptr,  # int64 [B, N]
    order_ptr,  # int64 [B, N]: sorted position -> original index
    count_ptr,  # int64 [B]: candidates per image (they come first in the order)
    n,
    max_output,
    threshold,  # float32: the largest float32 not above the IoU threshold
    keep_ptr,  # int64 [B, max_output], filled with -1 by the caller
    num_ptr,  # int64 [B]
    kept_ptr,  # float32 [B, max_output, 5] scratch: x1, y1, x2, y2, area of each kept box
    kept_class_ptr,  # int64 [B, max_output] scratch
    CHUNK: tl.constexpr,
    KEPT_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    boxes_ptr += b * n * 4
    areas_ptr += b * n
    classes_ptr += b * n
    order_ptr += b * n
    keep_ptr += b * max_output
    kept_ptr += b * max_output * 5
    kept_class_ptr += b * max_output
    candidates = tl.load(count_ptr + b).to(tl.int32)
    lanes = tl.arange(0, CHUNK)
    kept_lanes = tl.arange(0, KEPT_BLOCK)
    total = tl.zeros((), tl.int32)
    start = tl.zeros((), tl.int32)
    while (start < candidates) & (total < max_output):
        rows = start + lanes
        alive = rows < candidates
        x1, y1, x2, y2 = _load_box(boxes_ptr, rows, 4, alive)
        area = tl.load(areas_ptr + rows, mask=alive, other=0.0)
        cls = tl.load(classes_ptr + rows, mask=alive, other=0)
        # 1. Against every box kept in earlier chunks.
        for k in range(0, total, KEPT_BLOCK):
            slots = k + kept_lanes
            filled = slots < total
            kx1, ky1, kx2, ky2 = _load_box(kept_ptr, slots, 5, filled)
            k_area = tl.load(kept_ptr + slots * 5 + 4, mask=filled, other=0.0)
            k_cls = tl.load(kept_class_ptr + slots, mask=filled, other=0)
            iou = _iou(kx1[:, None], ky1[:, None], kx2[:, None], ky2[:, None], k_area[:, None],
                       x1[None, :], y1[None, :], x2[None, :], y2[None, :], area[None, :])
            hit = (iou > threshold) & (k_cls[:, None] == cls[None, :]) & filled[:, None]
            alive = alive & (tl.max(hit.to(tl.int32), axis=0) == 0)
        # 2. Among the chunk's survivors, in score order: the first one left is kept. One
        # reduction per kept box (the first survivor, CHUNK when none is left) drives the loop.
        first = tl.min(tl.where(alive, lanes, CHUNK), axis=0)
        while (first < CHUNK) & (total < max_output):
            row = start + first
            bx1, by1, bx2, by2 = _load_box(boxes_ptr, row, 4, True)
            b_area = tl.load(areas_ptr + row)
            b_cls = tl.load(classes_ptr + row)
            tl.store(keep_ptr + total, tl.load(order_ptr + row))
            tl.store(kept_ptr + total * 5 + 0, bx1)
            tl.store(kept_ptr + total * 5 + 1, by1)
            tl.store(kept_ptr + total * 5 + 2, bx2)
            tl.store(kept_ptr + total * 5 + 3, by2)
            tl.store(kept_ptr + total * 5 + 4, b_area)
            tl.store(kept_class_ptr + total, b_cls)
            total += 1
            iou = _iou(bx1, by1, bx2, by2, b_area, x1, y1, x2, y2, area)
            alive = alive & (lanes != first) & ~((iou > threshold) & (cls == b_cls))
            first = tl.min(tl.where(alive, lanes, CHUNK), axis=0)
        # The kept rows stored above are read back, by other threads, in the next chunk's step 1.
        tl.debug_barrier()
        start += CHUNK
    tl.store(num_ptr + b, total.to(tl.int64))


def triton_batched_nms_padded(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, score_threshold: float, max_output: int
) -> tuple[Tensor, Tensor]:
    """boxes float32 [B, N, 4], scores [B, N], classes int [B, N] -> keep [B, max_output] (-1 padded), num [B].

    CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
    Inputs are checked by the op; nothing here synchronises with the host.
    """
    if boxes.dtype != torch.float32:
        raise TypeError(f"the Triton NMS takes float32 boxes, got {boxes.dtype}")
    b, n = scores.shape
    if b * n * 5 >= 2**31 or b * max_output * 5 >= 2**31:
        raise ValueError("the Triton NMS indexes rows with int32; inputs are too large")
    device = boxes.device
    keep = torch.full((b, max_output), -1, dtype=torch.int64, device=device)
    num = torch.zeros(b, dtype=torch.int64, device=device)
    if b == 0 or n == 0 or max_output == 0:
        return keep, num
    candidate = scores > score_threshold  # evaluated by torch, as the CPU op does (NaN: never)
    key = torch.where(candidate, scores, torch.full_like(scores, float("-inf")))
    # Stable descending: ties keep the lower index first; non-candidates (-inf keys) sort last,
    # and the walk stops at the candidate count.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    sorted_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4)).contiguous()
    areas = (sorted_boxes[..., 2] - sorted_boxes[..., 0]) * (sorted_boxes[..., 3] - sorted_boxes[..., 1])
    sorted_classes = classes.to(torch.int64).gather(1, order).contiguous()
    count = candidate.sum(1)
    kept = torch.empty((b, max_output, 5), dtype=torch.float32, device=device)
    kept_classes = torch.empty((b, max_output), dtype=torch.int64, device=device)
    # Exactly representable in float32, so passing it as a float32 scalar loses nothing.
    threshold = float(largest_not_above(iou_threshold, torch.float32))
    nms_walk_kernel[(b,)](
        sorted_boxes, areas.contiguous(), sorted_classes, order, count, n, max_output, threshold,
        keep, num, kept, kept_classes,
        CHUNK=CHUNK, KEPT_BLOCK=KEPT_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return keep, num
