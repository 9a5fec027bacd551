"""COCO run-length encoding of masks, and the box-cropped form the pipeline ships.

numpy and pycocotools only, no torch: the postprocess stage encodes masks with this module,
and subscribers and the output writers decode them (through `pipeline.results`), without
paying for the model's imports.

Box-cropped RLE (docs/schema.md): an instance's mask travels as the COCO RLE of its part
inside the frame, cut to `crop_box` (x0, y0, x1, y1 in frame pixels, ends exclusive), so the
RLE's size is [y1 - y0, x1 - x0]. `encode_box_cropped_rle` makes one from the model's [M, M]
mask probabilities and box (`encode_crop_rle` from a binary crop already cut to the frame);
`decode_box_cropped_rle` and `paste_box_cropped_rle` give the full-frame mask back.

The paste in `encode_box_cropped_rle` is torchvision's `paste_masks_in_image` (as
`model.postprocess.paste_mask_cropped` does it in torch): the same box expansion in the box's
dtype, the same integer box, the same source pixels and float32 weights of the bilinear
resize. Only the last rounding of a blended value may differ from torch's CPU kernel (whose
multiply-adds the compiler may fuse), so a pixel whose probability lies within one float32
step of the threshold can fall the other way; every other pixel is decided as torch decides it.

Masks may be numpy arrays or torch tensors (read through `.detach().cpu().numpy()`, without
this module importing torch); results are numpy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

__all__ = [
    "decode_box_cropped_rle",
    "decode_rle",
    "encode_box_cropped_rle",
    "encode_crop_rle",
    "encode_rle",
    "mask_iou_rle",
    "paste_box_cropped_rle",
]


# Above this many crop pixels the run-by-run blend beats gathering rows (measured on a CPU).
_GATHER_MAX_PIXELS = 1 << 17


def encode_rle(binary_mask: Any) -> dict[str, Any]:
    """COCO compressed RLE of a [H,W] mask (nonzero = foreground), counts as str (JSON-able)."""
    m = _as_numpy(binary_mask, "binary_mask")
    if m.ndim != 2 or m.dtype not in (np.bool_, np.uint8):
        raise ValueError(
            f"binary_mask: expected a [H, W] bool or uint8 mask, got {m.dtype} {list(m.shape)}"
        )
    # pycocotools reads column-major uint8 and starts a run at every change of value,
    # so 0/255 or 0/2 masks must become 0/1 first.
    rle = mask_utils.encode(np.asfortranarray(m != 0, dtype=np.uint8))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(s) for s in rle["size"]], "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """[H,W] uint8 0/1 mask of a COCO RLE (compressed str/bytes or uncompressed list)."""
    return np.ascontiguousarray(_decode(_coco_rle(rle, "rle"), "rle"))


def mask_iou_rle(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Intersection over union of two RLE masks of the same size (0.0 if both empty)."""
    ra, rb = _coco_rle(a, "a"), _coco_rle(b, "b")
    if list(ra["size"]) != list(rb["size"]):
        raise ValueError(f"b: expected an RLE of size {ra['size']} like a, got {rb['size']}")
    return float(np.asarray(mask_utils.iou([ra], [rb], [0]))[0, 0])


def encode_crop_rle(binary_crop: Any, origin: Sequence[int]) -> tuple[dict[str, Any], tuple[int, int, int, int]]:
    """A mask's in-frame crop [h,w] whose top-left pixel is frame column x0, row y0 ->
    (its RLE, its crop box (x0, y0, x0 + w, y0 + h)): the inverse of decode_box_cropped_rle."""
    rle = encode_rle(binary_crop)
    h, w = rle["size"]
    x0, y0 = (int(v) for v in origin)
    return rle, (x0, y0, x0 + w, y0 + h)


def encode_box_cropped_rle(
    mask_probs: Any, box: Any, img_hw: Sequence[int], threshold: float = 0.5
) -> tuple[dict[str, Any], tuple[int, int, int, int]]:
    """One instance for the wire: its [M, M] mask probabilities pasted into its box (frame
    pixels, xyxy), cut to the frame and thresholded (foreground: prob > threshold; COCO eval
    uses 0.5) -> (RLE of that crop, the crop box). Probabilities are blended in float32."""
    probs = _as_numpy(mask_probs, "mask_probs")
    if probs.ndim != 2 or probs.shape[0] != probs.shape[1] or not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(
            f"mask_probs: expected floating [M, M] mask probabilities, got {probs.dtype} {list(probs.shape)}"
        )
    b = _as_numpy(np.asarray(box) if isinstance(box, (list, tuple)) else box, "box")
    if b.shape != (4,) or not np.issubdtype(b.dtype, np.floating) or not np.isfinite(b).all():
        got = b.tolist() if b.size <= 4 else list(b.shape)
        raise ValueError(f"box: expected finite floating [4] xyxy, got {b.dtype} {got}")
    binary, origin = _paste_thresholded(probs.astype(np.float32), b, _check_hw(img_hw, "img_hw"), threshold)
    return encode_crop_rle(binary, origin)


def decode_box_cropped_rle(rle: dict[str, Any], crop_box: Sequence[int], img_hw: Sequence[int]) -> np.ndarray:
    """Full-frame [H,W] uint8 0/1 mask of a box-cropped RLE (a JSON line's "rle" and "crop_box")."""
    out = np.zeros(_check_hw(img_hw, "img_hw"), dtype=np.uint8)
    paste_box_cropped_rle(rle, crop_box, out)
    return out


def paste_box_cropped_rle(rle: dict[str, Any], crop_box: Sequence[int], out: np.ndarray) -> None:
    """Write a box-cropped RLE's mask into the [H,W] frame `out` at its crop box (the rest of
    `out` is left as it is): what decodes N instances into one [N, H, W] array in place."""
    x0, y0, x1, y1 = box = tuple(int(v) for v in crop_box)
    height, width = out.shape
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"crop_box: {box} does not fit in a {height}x{width} frame")
    coco = _coco_rle(rle, "rle")
    if list(coco["size"]) != [y1 - y0, x1 - x0]:
        h, w = coco["size"]
        raise ValueError(f"crop_box: {box} implies a {y1 - y0}x{x1 - x0} crop, but the RLE is {h}x{w}")
    if x1 > x0 and y1 > y0:  # else the box lay wholly outside the frame: an empty mask
        out[y0:y1, x0:x1] = _decode(coco, "rle")


def _paste_thresholded(
    probs: np.ndarray, box: np.ndarray, img_hw: tuple[int, int], threshold: float
) -> tuple[np.ndarray, tuple[int, int]]:
    """torchvision's paste of one mask (padding 1), cut to the frame: (bool crop, (x0, y0))."""
    # The box grows by (M + 2) / M about its centre, so that the zero border the padding adds
    # falls outside the original box; kept in torchvision's operation order and in the box's
    # dtype, since the integer box truncates it and one ulp can move a mask edge by a pixel.
    f = box.dtype.type
    scale = f(float(probs.shape[0] + 2) / probs.shape[0])
    w_half = (box[2] - box[0]) * f(0.5) * scale
    h_half = (box[3] - box[1]) * f(0.5) * scale
    x_c = (box[2] + box[0]) * f(0.5)
    y_c = (box[3] + box[1]) * f(0.5)
    bx0, by0, bx1, by1 = (int(v) for v in (x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half))
    im_h, im_w = img_hw
    # Integer boxes include their last pixel (torchvision's TO_REMOVE); the clamps keep a box
    # wholly outside the frame from giving negative slice ends.
    w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
    x0, y0 = min(max(bx0, 0), im_w), min(max(by0, 0), im_h)
    x1, y1 = max(min(bx1 + 1, im_w), x0), max(min(by1 + 1, im_h), y0)
    out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    if out.size == 0:
        return out, (x0, y0)
    padded = np.pad(probs, 1).astype(np.float64)  # [M + 2, M + 2]
    n = padded.shape[0]
    c0, c1, cw0, cw1 = _linear_taps(n, w, x0 - bx0, x1 - bx0)
    r0, r1, rw0, rw1 = _linear_taps(n, h, y0 - by0, y1 - by0)
    rows = (padded[:, c0] * cw0 + padded[:, c1] * cw1).astype(np.float32)  # [M + 2, x1 - x0]
    cut = np.float32(threshold)  # torch compares a float32 tensor with the threshold in float32
    if out.size <= _GATHER_MAX_PIXELS:  # few numpy calls: what a small crop's time goes to
        blend = rows[r0]
        blend *= rw0[:, None]
        upper = rows[r1]
        upper *= rw1[:, None]
        blend += upper
        np.greater(blend, cut, out=out)
        return out, (x0, y0)
    # A large crop's output rows come in runs that blend the same two source rows: one
    # broadcast per run spares the memory traffic of gathered row copies. Same values.
    starts = np.flatnonzero(np.diff(r0, prepend=-1))
    for a, z in zip(starts, [*starts[1:], len(r0)]):
        blend = np.multiply.outer(rw0[a:z], rows[r0[a]])
        blend += np.multiply.outer(rw1[a:z], rows[r1[a]])
        np.greater(blend, cut, out=out[a:z])
    return out, (x0, y0)


def _linear_taps(
    in_size: int, out_size: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For outputs start..stop-1 of a bilinear resize in_size -> out_size (align_corners=False):
    the two source indices and their float32 weights, computed as torch's CPU kernel does."""
    i = np.arange(start, stop)
    if in_size == out_size:
        return i, i, np.ones(len(i), np.float32), np.zeros(len(i), np.float32)
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    # scale * (i + 0.5) - 0.5 is exact in float64 here, so this rounds once, as a fused multiply-add does
    src = np.maximum((scale * (i + 0.5) - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    return i0, np.where(i0 < in_size - 1, i0 + 1, i0), np.float32(1) - w1, w1


def _decode(coco: Any, name: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # pycocotools' array wrapper predates numpy 2's `copy` keyword; harmless noise
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            return mask_utils.decode(coco)
    except Exception as exc:  # pycocotools raises assorted types for corrupt counts
        raise ValueError(f"{name}: counts do not decode ({type(exc).__name__}: {exc})") from None


def _coco_rle(rle: Any, name: str) -> Any:
    """Validated copy of an RLE dict in the form pycocotools' C code accepts."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(
            f"{name}: expected a COCO RLE dict with 'size' and 'counts', got {rle!r:.80}"
        )
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and s >= 0 for s in size)
    ):
        raise ValueError(f"{name}: expected 'size' [H, W] of non-negative ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if isinstance(counts, list):  # uncompressed, as in COCO iscrowd annotations
        uncompressed: Any = {"size": [h, w], "counts": counts}
        return mask_utils.frPyObjects(uncompressed, h, w)
    if isinstance(counts, bytes):
        return {"size": [h, w], "counts": counts}
    raise ValueError(f"{name}: expected 'counts' str, bytes or list, got {type(counts).__name__}")


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):  # a torch.Tensor, known without importing torch
        return np.asarray(x.detach().cpu().numpy())
    raise ValueError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _check_hw(hw: Sequence[int], name: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in hw)
        ok = all(int(v) == v for v in hw)
    except (TypeError, ValueError):
        ok = False
    if not ok or h <= 0 or w <= 0:
        raise ValueError(f"{name}: expected (height, width) positive ints, got {hw!r}")
    return h, w
