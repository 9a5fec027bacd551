"""Multi-level RoIAlign in Triton: one kernel for the CUDA op, the interpreter and the TensorRT AOT plugin.

Semantics are those of plugins/roi_align/README.md (torchvision's MultiScaleRoIAlign + roi_align),
for float16 and float32 features: coordinates, weights and sums in float32, one rounding to the
feature dtype on store. float64 stays with the torch implementation.

Parallelisation: the output [B, R, C, S, S] is contiguous, so each box owns C*S*S consecutive
elements. Program (box, block) computes BLOCK of them: `program_id(0)` = b*R + r, `program_id(1)`
the block of the flat (c, ph, pw) index. Neighbouring lanes are neighbouring output bins of one
channel, so stores are coalesced and the bilinear taps of a warp fall on a few rows of one plane
(the access pattern of torchvision's CUDA kernel). The box's level, scale and sampling grid are
scalars computed once per program.

ABI, fixed by TensorRT's AOT plugins (input pointers, then int32 extras, then output pointers):
    roi_align_kernel(p2, p3, p4, p5, boxes, R, C, H2, W2, H3, W3, H4, W4, H5, W5, out, <constexprs>)
B is implied by the grid (`launch_grid`); float attributes cannot be passed as extras, so every
attribute is a constexpr and each attribute set is its own compiled kernel (`constexprs`).

A leaf: it imports triton, torch and the op's contract (plugins/roi_align/contract.py), nothing of
the model that dispatches to it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from maskstream.plugins.roi_align.contract import LEVEL_EPS, RoIAlignAttrs, check_inputs
from torch import Tensor

# Names of the int32 extra arguments, in kernel order; TensorRT builds its SymIntExprs in this order.
EXTRA_ARGS = ("R", "C", "H2", "W2", "H3", "W3", "H4", "W4", "H5", "W5")
# Output elements per program and warps per program: 2 elements per thread keeps enough loads in
# flight per thread without making the per-box scalar work (level, grid) a large share.
BLOCK = 256
NUM_WARPS = 4
SUPPORTED_DTYPES = (torch.float16, torch.float32)
# No fused multiply-adds: every float32 step then rounds as in the interpreter and the CPU op, which
# the tests check; the kernel is bound by its gathers, not by arithmetic.
ENABLE_FP_FUSION = False
_LEVEL_EPS = tl.constexpr(LEVEL_EPS)  # a jit function may read module globals only as constexpr


def constexprs(attrs: RoIAlignAttrs) -> dict[str, Any]:
    """The kernel's constexpr arguments for one attribute set (BLOCK included), by name."""
    return {
        "OUTPUT_SIZE": attrs.output_size, "SAMPLING_RATIO": attrs.sampling_ratio, "ALIGNED": bool(attrs.aligned),
        "CANONICAL_LEVEL": attrs.canonical_level, "CANONICAL_SCALE": attrs.canonical_scale,
        "FIRST_LEVEL": attrs.first_level, "BLOCK": BLOCK,
    }


def launch_grid(batch: Any, boxes_per_image: Any, channels: Any, output_size: int) -> tuple[Any, Any, int]:
    """(gx, gy, gz) of a launch: gx = B*R boxes, gy = ceil(C*S*S / BLOCK) blocks of each box's output.

    Only `*`, `+` and `//` with ints on the right, so TensorRT's symbolic shape expressions work
    in place of the ints (the AOT plugin builds its grid from them)."""
    return batch * boxes_per_image, (channels * (output_size * output_size) + (BLOCK - 1)) // BLOCK, 1


@triton.jit
def _in_box_dtype(x, dtype: tl.constexpr):
    # torch computes the level mapping op by op in the boxes' dtype; for float16 every step rounds
    # (a 300x300 box's area overflows to inf), so round after each float32 step to follow it.
    return x.to(dtype).to(tl.float32)


@triton.jit
def _level(x1, y1, x2, y2, dtype: tl.constexpr, CANONICAL_LEVEL: tl.constexpr, CANONICAL_SCALE: tl.constexpr,
           FIRST_LEVEL: tl.constexpr):
    """Level index 0..3 of one box, or -1 for a NaN level (negative area, NaN coordinate).

    IEEE-rounded sqrt and division, as torch: the approximate ones move boxes across the
    112/224/448 px boundaries. `tl.log2` because libdevice's fails in the interpreter.
    """
    area = _in_box_dtype(_in_box_dtype(x2 - x1, dtype) * _in_box_dtype(y2 - y1, dtype), dtype)
    size = _in_box_dtype(tl.sqrt_rn(area), dtype)
    ratio = _in_box_dtype(tl.div_rn(size, CANONICAL_SCALE * 1.0), dtype)
    eps = _in_box_dtype(tl.full([], _LEVEL_EPS, tl.float32), dtype)
    level = _in_box_dtype(_in_box_dtype(CANONICAL_LEVEL + _in_box_dtype(tl.log2(ratio), dtype), dtype) + eps, dtype)
    level = tl.floor(level)
    is_nan = level != level  # before the clamp: min/max may drop a NaN
    level = tl.minimum(tl.maximum(level, FIRST_LEVEL * 1.0), (FIRST_LEVEL + 3) * 1.0) - FIRST_LEVEL
    return tl.where(is_nan, -1, level.to(tl.int32))


@triton.jit
def _bilinear(feat, plane, y, x, height, width, mask):
    """torchvision's bilinear_interpolate at (y, x) [BLOCK] on planes starting at `plane` [BLOCK] int64."""
    valid = mask & (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)  # False for NaN
    # y <= 0 clamps to 0; invalid samples are parked at 0 too, so no NaN/inf reaches an int cast.
    y = tl.where(valid & (y > 0.0), y, 0.0)
    x = tl.where(valid & (x > 0.0), x, 0.0)
    y_low = y.to(tl.int32)  # y >= 0: truncation is floor
    x_low = x.to(tl.int32)
    y_last = y_low >= height - 1
    x_last = x_low >= width - 1
    y_high = tl.where(y_last, height - 1, y_low + 1)
    x_high = tl.where(x_last, width - 1, x_low + 1)
    y_low = tl.where(y_last, height - 1, y_low)
    x_low = tl.where(x_last, width - 1, x_low)
    y = tl.where(y_last, y_low.to(tl.float32), y)
    x = tl.where(x_last, x_low.to(tl.float32), x)
    ly = y - y_low.to(tl.float32)
    lx = x - x_low.to(tl.float32)
    hy = 1.0 - ly
    hx = 1.0 - lx
    row_low = plane + y_low * width
    row_high = plane + y_high * width
    v1 = tl.load(feat + row_low + x_low, mask=valid, other=0.0).to(tl.float32)
    v2 = tl.load(feat + row_low + x_high, mask=valid, other=0.0).to(tl.float32)
    v3 = tl.load(feat + row_high + x_low, mask=valid, other=0.0).to(tl.float32)
    v4 = tl.load(feat + row_high + x_high, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4, 0.0)


@triton.jit
def roi_align_kernel(
    p2, p3, p4, p5,  # [B, C, H_l, W_l] contiguous, float16 or float32
    boxes,  # [B, R, 4] (x1, y1, x2, y2) in image pixels, the features' dtype
    R, C, H2, W2, H3, W3, H4, W4, H5, W5,  # int32 extras, in EXTRA_ARGS order
    out,  # [B, R, C, S, S], the features' dtype
    OUTPUT_SIZE: tl.constexpr,
    SAMPLING_RATIO: tl.constexpr,
    ALIGNED: tl.constexpr,
    CANONICAL_LEVEL: tl.constexpr,
    CANONICAL_SCALE: tl.constexpr,
    FIRST_LEVEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    box = tl.program_id(0)  # b * R + r
    b = box // R
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # flat (c, ph, pw) within the box
    bins: tl.constexpr = OUTPUT_SIZE * OUTPUT_SIZE
    in_box = offs < C * bins
    c = offs // bins
    ph = (offs % bins) // OUTPUT_SIZE
    pw = offs % OUTPUT_SIZE

    box_dtype: tl.constexpr = boxes.dtype.element_ty
    x1 = tl.load(boxes + box * 4 + 0).to(tl.float32)
    y1 = tl.load(boxes + box * 4 + 1).to(tl.float32)
    x2 = tl.load(boxes + box * 4 + 2).to(tl.float32)
    y2 = tl.load(boxes + box * 4 + 3).to(tl.float32)
    level = _level(x1, y1, x2, y2, box_dtype, CANONICAL_LEVEL, CANONICAL_SCALE, FIRST_LEVEL)
    # A NaN level pools nothing: zeros. (A where, not `&` with a scalar: the interpreter turns that into int32.)
    mask = offs < tl.where(level >= 0, C * bins, 0)

    # The box's level as scalars; scales are exact powers of two.
    feat = tl.where(level == 0, p2, tl.where(level == 1, p3, tl.where(level == 2, p4, p5)))
    height = tl.where(level == 0, H2, tl.where(level == 1, H3, tl.where(level == 2, H4, H5)))
    width = tl.where(level == 0, W2, tl.where(level == 1, W3, tl.where(level == 2, W4, W5)))
    base_scale: tl.constexpr = 0.5 ** FIRST_LEVEL
    scale = tl.where(level <= 0, base_scale, tl.where(level == 1, base_scale * 0.5,
                                                      tl.where(level == 2, base_scale * 0.25, base_scale * 0.125)))
    # [BLOCK] start of each lane's (b, c) map; int64 because B*C*H*W may pass 2**31.
    plane = (b * C + c).to(tl.int64) * (height * width)

    offset: tl.constexpr = 0.5 if ALIGNED else 0.0
    start_x = x1 * scale - offset
    start_y = y1 * scale - offset
    roi_w = x2 * scale - offset - start_x
    roi_h = y2 * scale - offset - start_y
    if not ALIGNED:  # malformed boxes are forced to 1x1 (a NaN stays NaN, as torch's clamp)
        roi_w = tl.where(roi_w < 1.0, 1.0, roi_w)
        roi_h = tl.where(roi_h < 1.0, 1.0, roi_h)
    bin_w = tl.div_rn(roi_w, OUTPUT_SIZE * 1.0)
    bin_h = tl.div_rn(roi_h, OUTPUT_SIZE * 1.0)
    if SAMPLING_RATIO > 0:
        grid_h = SAMPLING_RATIO
        grid_w = SAMPLING_RATIO
        count = tl.full([], SAMPLING_RATIO * SAMPLING_RATIO, tl.float32)
    else:  # adaptive: ceil(roi / S) per axis; a non-finite or negative size gets no samples
        gh = tl.ceil(tl.div_rn(roi_h, OUTPUT_SIZE * 1.0))
        gw = tl.ceil(tl.div_rn(roi_w, OUTPUT_SIZE * 1.0))
        grid_h = tl.where((gh > 0.0) & (gh < float("inf")), gh, 0.0).to(tl.int32)
        grid_w = tl.where((gw > 0.0) & (gw < float("inf")), gw, 0.0).to(tl.int32)
        count = tl.maximum(grid_h * grid_w, 1).to(tl.float32)

    row_start = start_y + ph.to(tl.float32) * bin_h  # [BLOCK]
    col_start = start_x + pw.to(tl.float32) * bin_w
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for iy in range(grid_h):
        y = row_start + tl.div_rn((iy + 0.5) * bin_h, grid_h * 1.0)
        for ix in range(grid_w):
            x = col_start + tl.div_rn((ix + 0.5) * bin_w, grid_w * 1.0)
            acc += _bilinear(feat, plane, y, x, height, width, mask)

    result = tl.div_rn(acc, count)
    tl.store(out + box.to(tl.int64) * (C * bins) + offs, result.to(out.dtype.element_ty), mask=in_box)


def triton_multiscale_roi_align(features: Sequence[Tensor], boxes: Tensor, attrs: RoIAlignAttrs) -> Tensor:
    """The op through the Triton kernel: P2..P5, boxes [B, R, 4] -> [B, R, C, S, S] in the features' dtype.

    CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before this module was imported.
    """
    check_inputs(features, boxes, attrs.output_size)
    p2 = features[0]
    if p2.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton RoIAlign takes float16 or float32 features, got {p2.dtype}")
    b, r = boxes.shape[:2]
    c, s = p2.shape[1], attrs.output_size
    if max(f.numel() for f in features) >= 2**31 or b * r * 4 >= 2**31:
        raise ValueError("the Triton RoIAlign indexes boxes and feature rows with int32; inputs are too large")
    out = p2.new_empty((b, r, c, s, s))
    grid = launch_grid(b, r, c, s)
    if min(grid) == 0:
        return out
    p2, p3, p4, p5, boxes = (t.contiguous() for t in (*features, boxes))
    sizes = [size for f in (p2, p3, p4, p5) for size in f.shape[2:]]
    roi_align_kernel[grid](
        p2, p3, p4, p5, boxes, r, c, *sizes, out,
        **constexprs(attrs), num_warps=NUM_WARPS, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return out
