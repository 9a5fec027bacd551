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
    frames_hw = np.array([[im_h, im_w]] * count, np.int64).reshape(-1, 2)
    ints = _integer_boxes(boxes, mask_probs.shape[1])
    crop_boxes, flat = _crop_boxes(ints, frames_hw), _crop_pixels(mask_probs, ints, frames_hw, threshold).cpu().numpy()
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
    box_frames = sizes[np.repeat(np.arange(len(counts)), counts)]  # [N, 2] each box's frame
    ints = _integer_boxes(boxes, mask_probs.shape[1])
    crop_boxes = _crop_boxes(ints, box_frames)
    areas = (crop_boxes[:, 2] - crop_boxes[:, 0]).astype(np.int64) * (crop_boxes[:, 3] - crop_boxes[:, 1])
    box_ends = np.cumsum(counts, dtype=np.int64)
    pixels_before = np.concatenate([[0], np.cumsum(areas)])  # [N + 1]
    frame_pixels = pixels_before[box_ends] - pixels_before[box_ends - counts]  # [F]
    frame_bytes = (frame_pixels + 7) // 8
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=mask_probs.device)
    packed: list[np.ndarray] = []
    for first, last in _chunks(frame_pixels.tolist()):  # frames first..last-1
        b0, b1 = int(box_ends[first] - counts[first]), int(box_ends[last - 1])
        if not frame_pixels[first:last].sum():
            packed += [np.zeros(0, np.uint8)] * (last - first)
            continue
        above = _crop_pixels(mask_probs[b0:b1], ints[b0:b1], box_frames[b0:b1], threshold)
        # each frame's pixels padded with zeros to whole bytes, then eight pixels to a byte, the first the high bit
        pixels = frame_pixels[first:last].tolist()
        bits = torch.cat([F.pad(above[end - n : end].to(torch.uint8), (0, -n % 8))
                          for end, n in zip(np.cumsum(pixels).tolist(), pixels) if n])
        host = (bits.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8).cpu().numpy()
        starts = np.cumsum(frame_bytes[first:last]) - frame_bytes[first:last]
        packed += [host[a : a + nbytes] for a, nbytes in zip(starts.tolist(), frame_bytes[first:last].tolist())]
    return [(crop_boxes[int(end - n) : int(end)], bits) for end, n, bits in zip(box_ends, counts, packed)]


# The most crop pixels one pass of packed_crops computes (whole frames: a larger frame goes alone):
# every pixel takes a few index and value temporaries, so this bounds their memory.
_CHUNK_PIXELS = 1 << 22


def _chunks(frame_pixels: list[int]) -> list[tuple[int, int]]:
    """Consecutive frames (first, last + 1) of at most _CHUNK_PIXELS crop pixels together (or one frame)."""
    chunks, first, pixels = [], 0, 0
    for i, n in enumerate(frame_pixels):
        if i > first and pixels + n > _CHUNK_PIXELS:
            chunks.append((first, i))
            first, pixels = i, 0
        pixels += n
    if first < len(frame_pixels):
        chunks.append((first, len(frame_pixels)))
    return chunks


def _check(mask_probs: torch.Tensor, boxes: torch.Tensor) -> None:
    if mask_probs.ndim != 3 or mask_probs.shape[1] != mask_probs.shape[2] or not mask_probs.is_floating_point():
        raise ValueError(f"mask_probs: expected floating [N, M, M], got {mask_probs.dtype} {list(mask_probs.shape)}")
    if boxes.shape != (mask_probs.shape[0], 4) or not boxes.is_floating_point():
        raise ValueError(f"boxes: expected floating [{mask_probs.shape[0]}, 4] xyxy, got {boxes.dtype} "
                         f"{list(boxes.shape)}")


def _integer_boxes(boxes: torch.Tensor, size: int) -> np.ndarray:
    """torchvision's integer boxes of a paste of size x size masks (int64 [N, 4]), on the host: they
    size and place the crops."""
    return expand_boxes(boxes, float(size + 2) / size).to(torch.int64).cpu().numpy().reshape(-1, 4)


def _crop_boxes(ints: np.ndarray, frames_hw: np.ndarray) -> np.ndarray:
    """int32 [N, 4] each integer box's crop inside its frame (frames_hw: [N, 2]), ends exclusive."""
    bx0, by0, bx1, by1 = ints.T
    im_h, im_w = frames_hw[:, 0], frames_hw[:, 1]
    # Integer boxes include their last pixel (torchvision's TO_REMOVE); a box wholly outside gives an empty crop.
    x0, y0 = np.clip(bx0, 0, im_w), np.clip(by0, 0, im_h)
    x1, y1 = np.maximum(np.minimum(bx1 + 1, im_w), x0), np.maximum(np.minimum(by1 + 1, im_h), y0)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int32).reshape(-1, 4)


def _crop_pixels(mask_probs: torch.Tensor, ints: np.ndarray, frames_hw: np.ndarray, threshold: float
                 ) -> torch.Tensor:
    """The crops' pixels (bool [P] on the masks' device, each crop row by row, back to back) of
    every instance (ints: _integer_boxes, frames_hw: int64 [N, 2], each box's own frame)."""
    count, size = mask_probs.shape[0], mask_probs.shape[1]
    device = mask_probs.device
    n = size + 2
    crop_boxes = _crop_boxes(ints, frames_hw).astype(np.int64)
    x0, y0, x1, y1 = crop_boxes.T
    bx0, by0, bx1, by1 = ints.T
    out_w, out_h = np.maximum(bx1 - bx0 + 1, 1), np.maximum(by1 - by0 + 1, 1)  # the resized mask's size
    crop_w, crop_h = x1 - x0, y1 - y0
    total = int((crop_w * crop_h).sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    padded = F.pad(mask_probs.float(), (1, 1, 1, 1))  # [N, n, n]

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
    return blend > threshold  # [P] bool: the only pixels copied back


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
