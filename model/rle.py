"""COCO run-length encoding of masks, and the box-cropped form the pipeline ships.

numpy and pycocotools only, no torch: subscribers and the output writers decode masks with
this module (through `pipeline.results`) without paying for the model's imports.

Box-cropped RLE (docs/schema.md): an instance's mask travels as the COCO RLE of its part
inside the frame, cut to `crop_box` (x0, y0, x1, y1 in frame pixels, ends exclusive), so the
RLE's size is [y1 - y0, x1 - x0]. `encode_crop_rle` makes one from a binary crop and where it
sits (`model.postprocess.encode_box_cropped_rle` first pastes the model's mask probabilities,
which takes torch); `decode_box_cropped_rle` and `paste_box_cropped_rle` give the full-frame
mask back.

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
    "encode_crop_rle",
    "encode_rle",
    "mask_iou_rle",
    "paste_box_cropped_rle",
]


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
