"""RoIAlign over the four FPN levels P2..P5 as one custom op: `torch.ops.maskstream.multiscale_roi_align`.

Semantics are torchvision's `MultiScaleRoIAlign` followed by its CPU `roi_align` kernel; the
contract, edge cases and tolerances are in plugins/roi_align/README.md and spec.json; its attributes
and input checks, shared with the Triton kernel and the TensorRT plugin, in plugins/roi_align/contract.py.

Three implementations of the same numbers live here:
- `roi_align_reference`: float64 Python loops, a line-by-line transcription of the kernel.
- the op's eager implementation: every output bin is a fixed linear combination of feature
  pixels, so the whole op is one sparse matrix `A [B*R*S*S, sum_l B*H_l*W_l]` applied to the
  features laid out `[pixels, C]`. Building A is cheap elementwise work on the boxes; `A @ F`
  is a multithreaded sparse-dense product (MKL on CPU, cuSPARSE on CUDA) with no gather buffer,
  run in channel blocks so that no temporary is large; the backward is `A^T @ grad`, exactly
  the adjoint.
- `multiscale_roi_align_per_level_loop`: the torchvision-style Python loop over levels, kept as
  the honest baseline for benchmarks.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from maskstream.plugins.roi_align.contract import LEVEL_EPS, NUM_LEVELS, OP_NAME, RoIAlignAttrs, check_inputs
from torch import Tensor

__all__ = [
    "RoIAlignAttrs",
    "assign_levels",
    "multiscale_roi_align",
    "multiscale_roi_align_per_level_loop",
    "roi_align",
    "roi_align_reference",
    "roi_align_rois",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 has an 11-bit mantissa: a pixel coordinate near 300 is only good to 1/4 px, and
    # sums of 16 taps would lose more. Weights and accumulation run in float32 instead.
    return torch.float32 if dtype == torch.float16 else dtype


# ----------------------------------------------------------------------------- level mapping


def assign_levels(boxes: Tensor, attrs: RoIAlignAttrs | None = None, num_levels: int = NUM_LEVELS) -> Tensor:
    """Boxes [..., 4] -> level index [...] int64 in 0..num_levels-1, or -1 for no level.

    The mapping reads attrs' canonical_level, canonical_scale and first_level (None: the defaults).

    torchvision's LevelMapper (FPN paper eq. 1), evaluated in the boxes' own dtype as torchvision
    does, so a box exactly on a level boundary lands where torchvision puts it. Zero-area boxes
    (log2(0) = -inf) go to the first level. A negative area (exactly one of x2<x1, y2<y1) or a NaN
    coordinate gives a NaN level, which in torchvision matches no level and leaves that box's
    output at zero; it is made explicit here as -1.
    """
    mapper = attrs if attrs is not None else _LEVEL_DEFAULTS
    k0, s0, k_min = mapper.canonical_level, mapper.canonical_scale, mapper.first_level
    s = torch.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
    lvl = torch.floor(k0 + torch.log2(s / s0) + torch.tensor(LEVEL_EPS, dtype=s.dtype))
    lvl = torch.clamp(lvl, min=k_min, max=k_min + num_levels - 1)
    nan = torch.isnan(lvl)
    index = torch.where(nan, torch.zeros_like(lvl), lvl - k_min).to(torch.int64)
    return torch.where(nan, torch.full_like(index, -1), index)


# Level mapping only reads the mapper's fields; output_size is a placeholder.
_LEVEL_DEFAULTS = RoIAlignAttrs(output_size=1)


def _level_scales(attrs: RoIAlignAttrs) -> list[float]:
    return [attrs.spatial_scale(level) for level in range(NUM_LEVELS)]


# ----------------------------------------------------------------------------- sampling matrix


def _axis_taps(
    start: Tensor, bin_size: Tensor, grid: Tensor, size: Tensor, pooled: int, max_grid: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps of every sample along one axis, duplicates merged.

    start, bin_size [N] (compute dtype), grid, size [N] int64. Returns, per box and bin, up to
    L = 2*max_grid distinct pixel indices in increasing order: index [N, P, L] int64, weight
    [N, P, L] (including 1/grid, zero for out-of-range samples) and keep [N, P, L] bool, which
    marks the slots that hold a pixel with a nonzero weight.
    """
    dtype = start.dtype
    n = start.shape[0]
    p = torch.arange(pooled, device=start.device, dtype=dtype).view(1, -1, 1)
    i = torch.arange(max_grid, device=start.device, dtype=dtype).view(1, 1, -1)
    start, bin_size, grid_f = start.view(-1, 1, 1), bin_size.view(-1, 1, 1), grid.view(-1, 1, 1).to(dtype)
    size_f = size.view(-1, 1, 1).to(dtype)
    # Same operation order as the kernel: start + p*bin + ((i + .5) * bin) / grid.
    coord = start + p * bin_size + (i + 0.5) * bin_size / grid_f  # [N, P, G]
    # Written as "inside" so NaN coordinates count as outside, like the kernel's !(in range).
    valid = (coord >= -1.0) & (coord <= size_f) & (i < grid_f)
    coord = torch.where(valid, coord.clamp(min=0.0), torch.zeros_like(coord))
    low = coord.floor().to(torch.int64)
    last = (size - 1).view(-1, 1, 1)
    at_edge = low >= last
    low = torch.where(at_edge, last.expand_as(low), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(dtype))
    scale = valid.to(dtype) / grid_f.clamp(min=1.0)
    index = torch.stack([low, high], -1).view(n, pooled, 2 * max_grid)  # [N, P, 2G]
    weight = torch.stack([(1.0 - frac) * scale, frac * scale], -1).view(n, pooled, 2 * max_grid)

    # Merge taps that hit the same pixel (neighbouring samples share pixels whenever a bin is
    # under two pixels wide): fewer nonzeros, and a valid CSR row has no repeated column.
    index, order = index.sort(-1)
    weight = weight.gather(-1, order)
    new_run = torch.ones_like(index, dtype=torch.bool)
    new_run[..., 1:] = index[..., 1:] != index[..., :-1]
    run = new_run.cumsum(-1) - 1  # slot of each tap's distinct pixel
    merged_weight = torch.zeros_like(weight).scatter_add_(-1, run, weight)
    merged_index = torch.zeros_like(index).scatter_(-1, run, index)
    present = torch.arange(index.shape[-1], device=index.device) < new_run.sum(-1, keepdim=True)
    return merged_index, merged_weight, present & (merged_weight != 0)


def _sampling_matrix(
    boxes: Tensor,
    batch_index: Tensor,
    level: Tensor,
    level_shapes: Sequence[Sequence[int]],
    batch_size: int,
    scales: Sequence[float],
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The RoIAlign linear map as a sparse CSR matrix [N*S*S, sum_l batch_size*H_l*W_l].

    boxes [N, 4] in the compute dtype, batch_index [N] and level [N] int64 (-1: output zero).
    Column layout: level blocks in order, inside a block (b, y, x) row-major, which is how the
    caller lays out the features.
    """
    device, dtype = boxes.device, boxes.dtype
    n, s = boxes.shape[0], output_size
    heights = torch.tensor([h for h, _ in level_shapes], device=device)
    widths = torch.tensor([w for _, w in level_shapes], device=device)
    block = [batch_size * h * w for h, w in level_shapes]
    block_start = torch.tensor([0, *itertools.accumulate(block[:-1])], device=device)
    has_level = level >= 0
    lvl = level.clamp(min=0)
    height, width = heights[lvl], widths[lvl]
    scale = torch.tensor(list(scales), device=device, dtype=dtype)[lvl]

    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, k] * scale - offset for k in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # malformed boxes are forced to 1x1, as in the kernel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / s, roi_h / s
    if sampling_ratio > 0:
        grid_w = grid_h = torch.full((n,), sampling_ratio, device=device, dtype=torch.int64)
        max_grid = sampling_ratio
    else:  # adaptive: ceil(roi / pooled) samples per bin, per box
        # A non-finite box would ask for infinitely many samples (undefined in the C++ kernel);
        # it gets none, so it pools zeros.
        grid_w = torch.nan_to_num(torch.ceil(roi_w / s), nan=0.0, posinf=0.0).clamp(min=0).to(torch.int64)
        grid_h = torch.nan_to_num(torch.ceil(roi_h / s), nan=0.0, posinf=0.0).clamp(min=0).to(torch.int64)
        max_grid = int(max(1, grid_w.max().item(), grid_h.max().item())) if n else 1

    iy, wy, ky = _axis_taps(y1, bin_h, grid_h, height, s, max_grid)  # [N, S, L]
    ix, wx, kx = _axis_taps(x1, bin_w, grid_w, width, s, max_grid)
    ky = ky & has_level.view(-1, 1, 1)
    base = (block_start[lvl] + batch_index * height * width).view(-1, 1, 1, 1, 1)
    # Entry (ph, pw, a, b) couples y-tap a of row ph with x-tap b of column pw.
    col = base + (iy * width.view(-1, 1, 1))[:, :, None, :, None] + ix[:, None, :, None, :]  # [N, S, S, L, L]
    val = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    keep = ky[:, :, None, :, None] & kx[:, None, :, None, :]
    per_row = (ky.sum(-1)[:, :, None] * kx.sum(-1)[:, None, :]).flatten()  # [N*S*S] entries per row
    crow = torch.zeros(n * s * s + 1, device=device, dtype=torch.int64)
    crow[1:] = per_row.cumsum(0)
    # Row-major over (a, b) with both axes sorted and merged: columns strictly increase per row.
    # One nonzero shared by both selections (a boolean index per tensor would run it twice).
    entries = keep.flatten().nonzero().squeeze(1)
    return _csr(crow, col.flatten()[entries], val.flatten()[entries], (n * s * s, sum(block)))


def _csr(crow: Tensor, col: Tensor, val: Tensor, size: tuple[int, int]) -> Tensor:
    if max(col.numel(), *size) < 2**31:
        # MKL's sparse routines take 32-bit indices; torch would convert int64 ones on every product.
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    with warnings.catch_warnings():
        # torch flags every CSR tensor as beta; the ops used here (CSR @ dense) are long stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, size, check_invariants=False)


# Channel blocks keep each temporary buffer under this size. glibc hands larger blocks straight
# to mmap and back on free, so every call would page-fault them in afresh, which measured as
# costly as the arithmetic; smaller ones are reused from its heap. Narrower blocks also help the
# sparse product's cache use (32..64 channels was fastest at the box head's sizes).
BLOCK_BYTES = 16 << 20


def _channel_blocks(channels: int, rows: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """[start, stop) channel ranges whose [rows, stop-start] buffers fit BLOCK_BYTES."""
    width = max(1, min(channels, BLOCK_BYTES // (max(rows, 1) * dtype.itemsize)))
    return [(c0, min(c0 + width, channels)) for c0 in range(0, channels, width)]


def _pixels_by_channels(features: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Levels [B, C, H_l, W_l] -> one matrix [sum_l B*H_l*W_l, C], so that a row is one pixel."""
    channels = features[0].shape[1]
    sizes = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    out = torch.empty((sum(sizes), channels), device=features[0].device, dtype=dtype)
    start = 0
    for f, size in zip(features, sizes):
        # One strided copy per level (layout and, for float16, dtype), no intermediate.
        out[start:start + size].view(f.shape[0], f.shape[2], f.shape[3], channels).copy_(f.permute(0, 2, 3, 1))
        start += size
    return out


def _product(matrix: Tensor, dense: Tensor, out: Tensor | None) -> Tensor:
    """matrix @ dense into `out` (reused when its shape fits): torch's `matrix @ dense` zero-fills a
    fresh result and copies it once more, which made it ~4x slower than this addmm (measured)."""
    if out is None or out.shape != (matrix.shape[0], dense.shape[1]):
        out = dense.new_empty((matrix.shape[0], dense.shape[1]))
    return torch.addmm(out, matrix, dense, beta=0, out=out)


def _pool(matrix: Tensor, features: Sequence[Tensor], output_size: int) -> Tensor:
    """Sampling matrix [N*S*S, pixels] times the features -> a new [N, C, S, S] in their dtype."""
    c, s = features[0].shape[1], output_size
    n = matrix.shape[0] // (s * s)
    dtype = _compute_dtype(features[0].dtype)
    out = features[0].new_empty((n, c, s, s))
    pooled = None
    for c0, c1 in _channel_blocks(c, max(matrix.shape), dtype):
        pixels = _pixels_by_channels([f[:, c0:c1] for f in features], dtype)
        pooled = _product(matrix, pixels, pooled)  # [N*S*S, c1-c0]
        out[:, c0:c1].copy_(pooled.view(n, s, s, c1 - c0).permute(0, 3, 1, 2))  # [N, c1-c0, S, S]
    return out


def _apply(
    features: Sequence[Tensor],
    boxes: Tensor,
    level: Tensor,
    scales: Sequence[float],
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Forward through the sampling matrix. boxes [B, R, 4], level [B, R] -> [B, R, C, S, S]."""
    b, r = boxes.shape[:2]
    c, s = features[0].shape[1], output_size
    dtype = _compute_dtype(features[0].dtype)
    batch_index = torch.arange(b, device=boxes.device).repeat_interleave(r)
    matrix = _sampling_matrix(
        boxes.reshape(-1, 4).to(dtype), batch_index, level.reshape(-1), [f.shape[-2:] for f in features], b,
        scales, s, sampling_ratio, aligned,
    )
    return _pool(matrix, features, s).view(b, r, c, s, s)


def _apply_transpose(
    grad: Tensor,
    boxes: Tensor,
    level: Tensor,
    level_shapes: Sequence[Sequence[int]],
    scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
) -> list[Tensor]:
    """Adjoint of `_apply`: grad [B, R, C, S, S] -> one gradient [B, C, H_l, W_l] per level."""
    b, r, c, s = grad.shape[:4]
    dtype = _compute_dtype(grad.dtype)
    batch_index = torch.arange(b, device=boxes.device).repeat_interleave(r)
    matrix = _sampling_matrix(
        boxes.reshape(-1, 4).to(dtype), batch_index, level.reshape(-1), level_shapes, b,
        scales, s, sampling_ratio, aligned,
    )
    # Transposed explicitly to CSR, so the product is the same multithreaded kernel as the forward
    # (torch would otherwise convert the CSC view A.t() itself, more slowly).
    transposed = _transpose_csr(matrix)
    grads = [grad.new_empty((b, c, h, w)) for h, w in level_shapes]
    pixels = None
    for c0, c1 in _channel_blocks(c, max(matrix.shape), dtype):
        rows = torch.empty((b, r, s, s, c1 - c0), dtype=dtype, device=grad.device)
        rows.copy_(grad[:, :, c0:c1].permute(0, 1, 3, 4, 2))
        pixels = _product(transposed, rows.view(b * r * s * s, c1 - c0), pixels)  # [sum_l B*H_l*W_l, c1-c0]
        start = 0
        for (h, w), g in zip(level_shapes, grads):
            g[:, c0:c1].copy_(pixels[start:start + b * h * w].view(b, h, w, c1 - c0).permute(0, 3, 1, 2))
            start += b * h * w
    return grads


def _transpose_csr(matrix: Tensor) -> Tensor:
    """CSR [M, K] -> CSR of its transpose [K, M]: a stable sort of the entries by column."""
    crow, col, val = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    rows = torch.arange(matrix.shape[0], device=col.device, dtype=col.dtype).repeat_interleave(crow.diff())
    # Stable, so each new row keeps its entries in old-row order: sorted columns again.
    col_sorted, order = torch.sort(col, stable=True)
    crow_t = torch.zeros(matrix.shape[1] + 1, dtype=crow.dtype, device=crow.device)
    crow_t[1:] = torch.bincount(col_sorted, minlength=matrix.shape[1]).cumsum(0)
    return _csr(crow_t, rows[order], val[order], (matrix.shape[1], matrix.shape[0]))


# ----------------------------------------------------------------------------- the custom op


def _level_shapes(*features: Tensor) -> list[tuple[int, int]]:
    return [(f.shape[2], f.shape[3]) for f in features]


# The schema's attribute arguments come from RoIAlignAttrs, and the implementations take them as
# `*attrs` in that order: the attribute list is written once, in plugins/roi_align/contract.py.
@torch.library.custom_op(
    OP_NAME,
    mutates_args=(),
    schema=f"(Tensor p2, Tensor p3, Tensor p4, Tensor p5, Tensor boxes, {RoIAlignAttrs.schema()}) -> Tensor",
)
def _multiscale_roi_align_op(p2: Tensor, p3: Tensor, p4: Tensor, p5: Tensor, boxes: Tensor, *values: Any) -> Tensor:
    features, attrs = (p2, p3, p4, p5), RoIAlignAttrs.from_op_args(values)
    check_inputs(features, boxes, attrs.output_size)
    level = assign_levels(boxes, attrs)
    return _apply(features, boxes, level, _level_scales(attrs), attrs.output_size, attrs.sampling_ratio, attrs.aligned)


@_multiscale_roi_align_op.register_fake
def _(p2, p3, p4, p5, boxes, *values):
    s = RoIAlignAttrs.from_op_args(values).output_size
    check_inputs((p2, p3, p4, p5), boxes, s)
    return p2.new_empty((boxes.shape[0], boxes.shape[1], p2.shape[1], s, s))


@_multiscale_roi_align_op.register_kernel("cuda")
def _(p2, p3, p4, p5, boxes, *values):
    # On CUDA the forward is the Triton kernel (plugins/roi_align/kernel.py), the same code the
    # TensorRT plugin embeds. It is imported here, not at the top: triton is slow to import and
    # absent from CPU-only installs. float64, or no triton, stays with the sampling-matrix code.
    if p2.dtype in (torch.float16, torch.float32) and importlib.util.find_spec("triton") is not None:
        from maskstream.plugins.roi_align.kernel import triton_multiscale_roi_align

        return triton_multiscale_roi_align((p2, p3, p4, p5), boxes, RoIAlignAttrs.from_op_args(values))
    return _multiscale_roi_align_op._init_fn(p2, p3, p4, p5, boxes, *values)


@torch.library.custom_op(
    "maskstream::multiscale_roi_align_backward",
    mutates_args=(),
    schema=f"(Tensor grad, Tensor boxes, SymInt[] level_sizes, {RoIAlignAttrs.schema()})"
    " -> (Tensor, Tensor, Tensor, Tensor)",
)
def _multiscale_roi_align_backward_op(
    grad: Tensor, boxes: Tensor, level_sizes: list[int], *values: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradient w.r.t. P2..P5; level_sizes = [H2, W2, H3, W3, H4, W4, H5, W5]."""
    attrs = RoIAlignAttrs.from_op_args(values)
    shapes = list(zip(level_sizes[0::2], level_sizes[1::2]))
    level = assign_levels(boxes, attrs)
    g2, g3, g4, g5 = _apply_transpose(grad, boxes, level, shapes, _level_scales(attrs), attrs.sampling_ratio,
                                      attrs.aligned)
    return g2, g3, g4, g5


@_multiscale_roi_align_backward_op.register_fake
def _(grad, boxes, level_sizes, *values):
    b, c = grad.shape[0], grad.shape[2]
    h2, w2, h3, w3, h4, w4, h5, w5 = level_sizes
    return tuple(grad.new_empty((b, c, h, w)) for h, w in ((h2, w2), (h3, w3), (h4, w4), (h5, w5)))


def _setup_context(ctx, inputs, output):
    p2, p3, p4, p5, boxes, *values = inputs
    ctx.save_for_backward(boxes)
    ctx.level_sizes = [size for h_w in _level_shapes(p2, p3, p4, p5) for size in h_w]
    ctx.attrs = RoIAlignAttrs.from_op_args(values)


def _backward(ctx, grad):
    (boxes,) = ctx.saved_tensors
    grads = torch.ops.maskstream.multiscale_roi_align_backward(grad, boxes, ctx.level_sizes, *ctx.attrs.op_args())
    # Boxes are not differentiated (torchvision neither); the rest are attributes.
    return (*grads, None, *(None for _ in ctx.attrs.op_args()))


_multiscale_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


def multiscale_roi_align(features: Sequence[Tensor], boxes: Tensor, attrs: RoIAlignAttrs) -> Tensor:
    """P2..P5 [B, C, H_l, W_l] and boxes [B, R, 4] in image pixels -> pooled [B, R, C, S, S]."""
    check_inputs(features, boxes, attrs.output_size)
    return torch.ops.maskstream.multiscale_roi_align(*features, boxes, *attrs.op_args())


# ----------------------------------------------------------------------------- single level + baseline


def roi_align(
    feature: Tensor,
    boxes: Tensor,
    spatial_scale: float,
    output_size: int,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """One level: feature [B, C, H, W], boxes [B, R, 4] -> [B, R, C, S, S] (torchvision's roi_align)."""
    check_inputs([feature], boxes, output_size, num_levels=1)
    level = torch.zeros(boxes.shape[:2], dtype=torch.int64, device=boxes.device)
    return _apply([feature], boxes, level, [spatial_scale], output_size, sampling_ratio, aligned)


def roi_align_rois(
    feature: Tensor, rois: Tensor, spatial_scale: float, output_size: int, sampling_ratio: int, aligned: bool
) -> Tensor:
    """torchvision's calling convention: rois [K, 5] = (batch index, x1, y1, x2, y2) -> [K, C, S, S]."""
    k, b, s = rois.shape[0], feature.shape[0], output_size
    dtype = _compute_dtype(feature.dtype)
    matrix = _sampling_matrix(
        rois[:, 1:].to(dtype), rois[:, 0].to(torch.int64), torch.zeros(k, dtype=torch.int64, device=rois.device),
        [feature.shape[-2:]], b, [spatial_scale], s, sampling_ratio, aligned,
    )
    return _pool(matrix, [feature], s)  # [K, C, S, S]


def multiscale_roi_align_per_level_loop(features: Sequence[Tensor], boxes: Tensor, attrs: RoIAlignAttrs) -> Tensor:
    """Baseline with the op's semantics, written the way torchvision's MultiScaleRoIAlign is:
    select each level's boxes, pool them with the single-level kernel, scatter the rows back."""
    check_inputs(features, boxes, attrs.output_size)
    b, r = boxes.shape[:2]
    c, s = features[0].shape[1], attrs.output_size
    batch = torch.arange(b, device=boxes.device, dtype=boxes.dtype).view(b, 1, 1).expand(b, r, 1)
    rois = torch.cat([batch, boxes], -1).reshape(b * r, 5)  # [B*R, 5]
    levels = assign_levels(boxes, attrs).reshape(-1)
    result = features[0].new_zeros((b * r, c, s, s))
    for level, feature in enumerate(features):
        idx = torch.nonzero(levels == level).squeeze(1)
        result[idx] = roi_align_rois(
            feature, rois[idx], attrs.spatial_scale(level), s, attrs.sampling_ratio, attrs.aligned
        )
    return result.view(b, r, c, s, s)


# ----------------------------------------------------------------------------- float64 reference


def _bilinear(f: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's bilinear_interpolate on one [C, H, W] map at (y, x); returns [C]."""
    height, width = f.shape[1], f.shape[2]
    if not (-1.0 <= y <= height and -1.0 <= x <= width):
        return np.zeros(f.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * f[:, y_low, x_low] + hy * lx * f[:, y_low, x_high]
            + ly * hx * f[:, y_high, x_low] + ly * lx * f[:, y_high, x_high])


def _adaptive_grid(roi_size: float, pooled: int) -> int:
    """ceil(roi_size / pooled) samples; none for a non-finite box (see _sampling_matrix)."""
    return math.ceil(roi_size / pooled) if math.isfinite(roi_size) else 0


def _roi_align_one_box(
    f: np.ndarray, box: Sequence[float], scale: float, size: int, sampling_ratio: int, aligned: bool
) -> np.ndarray:
    """torchvision's roi_align forward for one box on one [C, H, W] map -> [C, S, S]."""
    offset = 0.5 if aligned else 0.0
    start_w, start_h = box[0] * scale - offset, box[1] * scale - offset
    roi_w, roi_h = box[2] * scale - offset - start_w, box[3] * scale - offset - start_h
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / size, roi_h / size
    grid_h = sampling_ratio if sampling_ratio > 0 else _adaptive_grid(roi_h, size)
    grid_w = sampling_ratio if sampling_ratio > 0 else _adaptive_grid(roi_w, size)
    count = max(grid_h * grid_w, 1)
    out = np.zeros((f.shape[0], size, size))
    for ph in range(size):
        for pw in range(size):
            total = np.zeros(f.shape[0])
            for iy in range(grid_h):
                y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    total += _bilinear(f, y, x)
            out[:, ph, pw] = total / count
    return out


def roi_align_reference(features: Sequence[Tensor], boxes: Tensor, attrs: RoIAlignAttrs) -> Tensor:
    """Slow float64 loop reference of the op -> [B, R, C, S, S] float64 (small shapes only).

    Levels are assigned in the boxes' own dtype (as the op and torchvision do); everything after
    that runs in float64 on the inputs converted exactly.
    """
    check_inputs(features, boxes, attrs.output_size)
    levels = assign_levels(boxes, attrs).tolist()
    maps = [f.detach().cpu().to(torch.float64).numpy() for f in features]
    boxes64 = boxes.detach().cpu().to(torch.float64).tolist()
    b, r = boxes.shape[:2]
    c, s = features[0].shape[1], attrs.output_size
    out = np.zeros((b, r, c, s, s))
    for i in range(b):
        for j in range(r):
            lvl = levels[i][j]
            if lvl < 0:
                continue  # NaN level: torchvision pools this box on no level
            scale = attrs.spatial_scale(lvl)
            out[i, j] = _roi_align_one_box(maps[lvl][i], boxes64[i][j], scale, s, attrs.sampling_ratio, attrs.aligned)
    return torch.from_numpy(out)
