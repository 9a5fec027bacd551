"""Masks pasted and thresholded where the model ran, and only each box's binary crop copied back.

The postprocess stage pastes each instance's 28x28 probabilities into its box in numpy
(model.rle.encode_box_cropped_rle). Where the masks are on a GPU, `binary_crops` does the same
paste for every instance of a frame at once, as torch ops on the masks' device: one flat tensor
holds the in-frame crops of all boxes back to back, each pixel's bilinear blend computed from its
box's taps (torchvision's `paste_masks_in_image`: the box grown by (M + 2) / M, the integer box,
`F.interpolate(..., mode="bilinear", align_corners=False)` of the zero-padded mask; each crop
column's blend across x of every source row made once, then each pixel's across y), thresholded
there, and copied to the host once: the crops' pixels as bytes, nothing of the rest of the frame,
no float probabilities. The crops are those of `model.postprocess.paste_mask_cropped`; a pixel may
only differ from the numpy paste where its probability lies within one float32 step of the
threshold (the last rounding of a blend, as between numpy's and torch's CPU pastes).

`packed_crops` does the same for the instances of several frames at once (an inference batch: one
pass, one copy back) and packs each frame's crop pixels into bits on the device, as np.packbits
would (the form RawDetections.crop_bits carries), so the copy back is an eighth of the bytes.

    crops = binary_crops(mask_probs, boxes, frame_hw)   # [N, M, M] probs, [N, 4] frame-pixel boxes
    for crop, (x0, y0) in crops: encode_crop_rle(crop, (x0, y0))
    for crop_boxes, bits in packed_crops(mask_probs, boxes, frames_hw, counts): ...
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from maskstream.model.postprocess import expand_boxes

__all__ = ["binary_crops", "packed_crops"]


def binary_crops(mask_probs: torch.Tensor, boxes: torch.Tensor, frame_hw: Sequence[int], threshold: float = 0.5
                 ) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """float [N, M, M] mask probabilities and float32 [N, 4] xyxy boxes in frame pixels (same
    device) -> per instance (bool crop [h, w] of its pasted mask inside the frame, (x0, y0) where
    the crop's top-left pixel lies): paste_mask_cropped(...) > threshold for each, in one pass."""
    _check(mask_probs, boxes)
    count = mask_probs.shape[0]
    im_h, im_w = (int(v) for v in frame_hw)
    crop_boxes, above = _crop_pixels(mask_probs, boxes, np.array([[im_h, im_w]] * count, np.int64).reshape(-1, 2),
                                     threshold)
    flat = above.cpu().numpy()
    crops, start = [], 0
    for x0, y0, x1, y1 in crop_boxes.tolist():
        h, w = y1 - y0, x1 - x0
        crops.append((flat[start : start + h * w].reshape(h, w), (x0, y0)))
        start += h * w
    return crops


def packed_crops(mask_probs: torch.Tensor, boxes: torch.Tensor, frames_hw: Sequence[Sequence[int]],
                 counts: Sequence[int], threshold: float = 0.5) -> list[tuple[np.ndarray, np.ndarray]]:
    """The instances of several frames, back to back (counts[f] of frame f, whose size is
    frames_hw[f]): float [N, M, M] probabilities and float32 [N, 4] frame-pixel boxes on one
    device -> per frame (int32 [n, 4] crop boxes x0, y0, x1, y1, ends exclusive, inside the frame;
    uint8 [ceil(P / 8)] its P crop pixels, each crop row by row, back to back, packed as
    np.packbits packs them: the first pixel in the high bit, the last byte's spare bits 0).
    The crops are binary_crops' (the same pixels); one pass and one copy back for all frames."""
    _check(mask_probs, boxes)
    counts = [int(n) for n in counts]
    if len(counts) != len(frames_hw) or any(n < 0 for n in counts) or sum(counts) != mask_probs.shape[0]:
        raise ValueError(f"counts: expected one count >= 0 per frame ({len(frames_hw)}) adding up to the "
                         f"{mask_probs.shape[0]} instances, got {counts}")
    sizes = np.asarray([[int(h), int(w)] for h, w in frames_hw], np.int64).reshape(-1, 2)
    frame_of = np.repeat(np.arange(len(counts)), counts)  # [N]
    crop_boxes, above = _crop_pixels(mask_probs, boxes, sizes[frame_of], threshold)
    areas = (crop_boxes[:, 2] - crop_boxes[:, 0]).astype(np.int64) * (crop_boxes[:, 3] - crop_boxes[:, 1])
    ends = np.cumsum(counts, dtype=np.int64)
    pixels_before = np.concatenate([[0], np.cumsum(areas)])  # [N + 1]
    frame_pixels = pixels_before[ends] - pixels_before[ends - counts]  # [F]
    frame_bytes = (frame_pixels + 7) // 8
    total_bytes = int(frame_bytes.sum())
    if total_bytes:
        # Each frame's pixels padded with zeros to whole bytes, then eight pixels to a byte, the first the high bit.
        bits = torch.cat([F.pad(above[end - pixels : end].to(torch.uint8), (0, int(-pixels % 8)))
                          for end, pixels in zip(np.cumsum(frame_pixels).tolist(), frame_pixels.tolist()) if pixels])
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=mask_probs.device)
        host = (bits.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8).cpu().numpy()
    else:
        host = np.zeros(0, np.uint8)
    out, box_start, byte_start = [], 0, 0
    for n, nbytes in zip(counts, frame_bytes.tolist()):
        out.append((crop_boxes[box_start : box_start + n], host[byte_start : byte_start + nbytes]))
        box_start, byte_start = box_start + n, byte_start + nbytes
    return out


def _check(mask_probs: torch.Tensor, boxes: torch.Tensor) -> None:
    if mask_probs.ndim != 3 or mask_probs.shape[1] != mask_probs.shape[2] or not mask_probs.is_floating_point():
        raise ValueError(f"mask_probs: expected floating [N, M, M], got {mask_probs.dtype} {list(mask_probs.shape)}")
    if boxes.shape != (mask_probs.shape[0], 4) or not boxes.is_floating_point():
        raise ValueError(f"boxes: expected floating [{mask_probs.shape[0]}, 4] xyxy, got {boxes.dtype} "
                         f"{list(boxes.shape)}")


def _crop_pixels(mask_probs: torch.Tensor, boxes: torch.Tensor, frames_hw: np.ndarray, threshold: float
                 ) -> tuple[np.ndarray, torch.Tensor]:
    """Every instance's in-frame crop (frames_hw: int64 [N, 2], each box's own frame): (int32 [N, 4]
    crop boxes, ends exclusive; bool [P] on the masks' device, the crops' pixels row by row, back to back)."""
    count, size = mask_probs.shape[0], mask_probs.shape[1]
    device = mask_probs.device
    if count == 0:
        return np.zeros((0, 4), np.int32), torch.zeros(0, dtype=torch.bool, device=device)
    im_h, im_w = frames_hw[:, 0], frames_hw[:, 1]
    padded = F.pad(mask_probs.float(), (1, 1, 1, 1))  # [N, n, n], n = M + 2
    n = size + 2
    ints = expand_boxes(boxes, float(n) / size).to(torch.int64)  # [N, 4] the integer boxes, torchvision's
    # The crop geometry, on the host: it sizes the flat output and is the crops' placement anyway.
    bx0, by0, bx1, by1 = ints.cpu().numpy().T
    out_w, out_h = np.maximum(bx1 - bx0 + 1, 1), np.maximum(by1 - by0 + 1, 1)  # the resized mask's size
    x0, y0 = np.clip(bx0, 0, im_w), np.clip(by0, 0, im_h)
    x1, y1 = np.maximum(np.minimum(bx1 + 1, im_w), x0), np.maximum(np.minimum(by1 + 1, im_h), y0)
    crop_boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.int32)
    crop_w, crop_h = x1 - x0, y1 - y0
    sizes = crop_w * crop_h
    total = int(sizes.sum())
    if total == 0:
        return crop_boxes, torch.zeros(0, dtype=torch.bool, device=device)

    def on_device(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device, non_blocking=True)

    # The taps of every crop row and every crop column (few: sum of heights, sum of widths), each
    # row's and column's place in its box's resized mask starting at y0 - by0, x0 - bx0.
    row_box = torch.repeat_interleave(torch.arange(count, device=device), on_device(crop_h),
                                      output_size=int(crop_h.sum()))
    col_box = torch.repeat_interleave(torch.arange(count, device=device), on_device(crop_w),
                                      output_size=int(crop_w.sum()))
    col_start = on_device(np.cumsum(crop_w) - crop_w)  # [N] each box's first column among all columns
    row_in_box = torch.arange(len(row_box), device=device) - on_device(np.cumsum(crop_h) - crop_h)[row_box]
    col_in_box = torch.arange(len(col_box), device=device) - col_start[col_box]
    y_lo, y_hi, y_w0, y_w1 = _taps(row_in_box + on_device(y0 - by0)[row_box], on_device(out_h)[row_box], n)
    x_lo, x_hi, x_w0, x_w1 = _taps(col_in_box + on_device(x0 - bx0)[col_box], on_device(out_w)[col_box], n)
    # torch's order: each source row blended across x first (here every source row of each crop
    # column: [columns, n], few), then, per pixel, the two source rows of its crop row across y.
    source_rows = torch.arange(n, device=device)[None, :]
    across = (x_w0[:, None] * padded[col_box[:, None], source_rows, x_lo[:, None]]
              + x_w1[:, None] * padded[col_box[:, None], source_rows, x_hi[:, None]]).reshape(-1)  # [columns * n]
    # Pixels in crop order (box, row, column): crop row r holds the crop width of its box, so
    # pixel p of row r (whose first pixel is s) is column col_start + p - s, at index
    # (col_start + p - s) * n + y_lo[r] of `across`: n * p plus a per-row offset.
    row_width = crop_w[row_box.cpu().numpy()] if len(row_box) else np.zeros(0, np.int64)
    widths = on_device(row_width)
    row_offset = n * (col_start[row_box] - on_device(np.cumsum(row_width) - row_width)) + y_lo
    top = n * torch.arange(total, device=device) + torch.repeat_interleave(row_offset, widths, output_size=total)
    bottom = top + torch.repeat_interleave(y_hi - y_lo, widths, output_size=total)
    blend = (torch.repeat_interleave(y_w0, widths, output_size=total) * across[top]
             + torch.repeat_interleave(y_w1, widths, output_size=total) * across[bottom])
    return crop_boxes, blend > threshold  # [P] bool: the only pixels copied back


def _taps(out_index: torch.Tensor, out_size: torch.Tensor, in_size: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's bilinear resize (align_corners=False) of in_size -> out_size (per pixel) at
    out_index: the two source indices and their float32 weights, as its CPU kernel computes them:
    a float32 scale, the source coordinate in float64 (exact here) rounded once to float32."""
    scale = torch.tensor(float(in_size), dtype=torch.float32, device=out_index.device) / out_size.float()
    src = (scale.double() * (out_index.double() + 0.5) - 0.5).float().clamp_(min=0)
    lo = src.to(torch.int64)  # non-negative: truncation is floor
    hi = torch.where(lo < in_size - 1, lo + 1, lo)
    w1 = src - lo.float()
    return lo, hi, 1.0 - w1, w1
