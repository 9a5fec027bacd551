"""After inference: boxes back to frame pixels, masks pasted into their boxes.

`rescale_boxes` and `paste_masks_in_image` reproduce torchvision's
`transform.resize_boxes` and `roi_heads.paste_masks_in_image` operation for operation
(same float32 ratios, same box expansion, same int64 truncation, same bilinear
`F.interpolate`), so our masks are bit-identical to torchvision's. The pipeline never
ships full-frame masks: `paste_mask_cropped` gives the part of one pasted mask that lies
inside the frame, plus where it goes; `model.rle.encode_box_cropped_rle` does the same paste in
numpy (the postprocess stage runs without torch) and encodes it for the wire.

Arrays may be numpy or torch; results come back as the same kind as the main input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from maskstream.model.rle import _check_hw

__all__ = [
    "expand_boxes",
    "paste_mask_cropped",
    "paste_masks_in_image",
    "rescale_boxes",
    "uncrop",
]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


# --------------------------------------------------------------------------- boxes


def rescale_boxes(boxes: ArrayT, from_hw: Sequence[int], to_hw: Sequence[int]) -> ArrayT:
    """Boxes [N,4] xyxy in an image of size `from_hw` -> the same boxes in `to_hw`.

    torchvision's `resize_boxes`: the ratios are float32 scalars, x scales with the
    width ratio and y with the height ratio.
    """
    t, was_numpy = _as_tensor(boxes, "boxes")
    _check_boxes(t, "boxes")
    from_h, from_w = _check_hw(from_hw, "from_hw")
    to_h, to_w = _check_hw(to_hw, "to_hw")
    ratio_h = torch.tensor(to_h, dtype=torch.float32) / torch.tensor(from_h, dtype=torch.float32)
    ratio_w = torch.tensor(to_w, dtype=torch.float32) / torch.tensor(from_w, dtype=torch.float32)
    xmin, ymin, xmax, ymax = t.unbind(1)
    out = torch.stack((xmin * ratio_w, ymin * ratio_h, xmax * ratio_w, ymax * ratio_h), dim=1)
    return _back(out, was_numpy)  # type: ignore[return-value]


# --------------------------------------------------------------------------- pasting


def paste_masks_in_image(
    masks: ArrayT,
    boxes: np.ndarray | torch.Tensor,
    img_hw: Sequence[int],
    padding: int = 1,
) -> ArrayT:
    """Mask probabilities [N,1,M,M] in their boxes [N,4] (frame pixels) -> [N,1,H,W].

    Same result as torchvision's `paste_masks_in_image`. Where torchvision fails (a box
    wholly outside the frame makes its slices negative and the copy a shape error), the
    mask here is simply all zeros.
    """
    m, was_numpy = _as_tensor(masks, "masks")
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[2] != m.shape[3] or not m.is_floating_point():
        raise ValueError(
            f"masks: expected floating [N, 1, M, M] mask probabilities, "
            f"got {m.dtype} {list(m.shape)}"
        )
    b, _ = _as_tensor(boxes, "boxes")
    _check_boxes(b, "boxes")
    if b.shape[0] != m.shape[0]:
        raise ValueError(f"boxes: expected one box per mask ({m.shape[0]}), got {b.shape[0]} boxes")
    im_h, im_w = _check_hw(img_hw, "img_hw")
    _check_padding(padding)

    padded, scale = _expand_masks(m, padding)  # [N, 1, M+2p, M+2p]
    int_boxes = expand_boxes(b, scale).to(dtype=torch.int64)
    out = m.new_zeros((m.shape[0], 1, im_h, im_w))
    for i in range(m.shape[0]):
        crop, (x0, y0) = _paste_one(padded[i, 0], int_boxes[i], im_h, im_w)
        out[i, 0, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return _back(out, was_numpy)  # type: ignore[return-value]


def paste_mask_cropped(
    mask: ArrayT, box: Any, img_hw: Sequence[int], padding: int = 1
) -> tuple[ArrayT, tuple[int, int]]:
    """One mask [M,M] pasted into its box, cut to the frame: (crop [h,w], (x0, y0)).

    Putting `crop` at column x0, row y0 of an all-zero [H,W] frame gives exactly the
    full-frame `paste_masks_in_image` result for this instance. A box wholly outside the
    frame gives an empty crop.
    """
    m, was_numpy = _as_tensor(mask, "mask")
    if m.ndim != 2 or m.shape[0] != m.shape[1] or not m.is_floating_point():
        raise ValueError(
            f"mask: expected floating [M, M] mask probabilities, got {m.dtype} {list(m.shape)}"
        )
    b, _ = _as_tensor(box, "box")
    if b.shape != (4,) or not b.is_floating_point():
        raise ValueError(f"box: expected floating [4] xyxy, got {b.dtype} {list(b.shape)}")
    im_h, im_w = _check_hw(img_hw, "img_hw")
    _check_padding(padding)

    padded, scale = _expand_masks(m, padding)  # [M+2p, M+2p]
    int_box = expand_boxes(b[None], scale).to(dtype=torch.int64)[0]
    crop, origin = _paste_one(padded, int_box, im_h, im_w)
    return _back(crop, was_numpy), origin  # type: ignore[return-value]


def uncrop(crop: ArrayT, origin: Sequence[int], img_hw: Sequence[int]) -> ArrayT:
    """Place a crop [h,w] at (x0, y0) of an all-zero [H,W] frame of the crop's dtype."""
    c, was_numpy = _as_tensor(crop, "crop")
    if c.ndim != 2:
        raise ValueError(f"crop: expected a 2-D [h, w] array, got shape {list(c.shape)}")
    im_h, im_w = _check_hw(img_hw, "img_hw")
    x0, y0 = (int(v) for v in origin)
    h, w = c.shape
    if x0 < 0 or y0 < 0 or x0 + w > im_w or y0 + h > im_h:
        raise ValueError(
            f"origin: crop of {h}x{w} at (x0={x0}, y0={y0}) does not fit in a {im_h}x{im_w} frame"
        )
    out = c.new_zeros((im_h, im_w))
    out[y0 : y0 + h, x0 : x0 + w] = c
    return _back(out, was_numpy)  # type: ignore[return-value]


def _expand_masks(mask: torch.Tensor, padding: int) -> tuple[torch.Tensor, float]:
    # The padding gives the bilinear resize a zero border to fade into; the box is then
    # grown by the same factor so the original M x M still covers the original box.
    size = mask.shape[-1]
    scale = float(size + 2 * padding) / size
    return F.pad(mask, (padding,) * 4), scale


def expand_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    # Kept in torchvision's exact operation order: the boxes are truncated to int64
    # afterwards, so one ulp of difference here can move a mask edge by a pixel.
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half *= scale
    h_half *= scale
    out = torch.zeros_like(boxes)
    out[:, 0] = x_c - w_half
    out[:, 2] = x_c + w_half
    out[:, 1] = y_c - h_half
    out[:, 3] = y_c + h_half
    return out


def _paste_one(
    padded: torch.Tensor, box: torch.Tensor, im_h: int, im_w: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """torchvision's `paste_mask_in_image`, returning only the in-frame part."""
    bx0, by0, bx1, by1 = (int(v) for v in box.tolist())
    # Integer boxes include their last pixel, hence the +1 (torchvision's TO_REMOVE).
    w = max(bx1 - bx0 + 1, 1)
    h = max(by1 - by0 + 1, 1)
    # Clip to the frame; the extra clamps keep a box wholly outside from producing the
    # negative slice ends that Python would wrap around.
    x0 = min(max(bx0, 0), im_w)
    y0 = min(max(by0, 0), im_h)
    x1 = max(min(bx1 + 1, im_w), x0)
    y1 = max(min(by1 + 1, im_h), y0)
    if x1 == x0 or y1 == y0:
        return padded.new_zeros((y1 - y0, x1 - x0)), (x0, y0)
    resized = F.interpolate(
        padded.expand((1, 1, -1, -1)), size=(h, w), mode="bilinear", align_corners=False
    )[0, 0]  # [h, w]
    return resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0], (x0, y0)


# --------------------------------------------------------------------------- checks


def _as_tensor(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        # from_numpy warns on read-only arrays (e.g. from a shared-memory ring); copy those
        return torch.from_numpy(x if x.flags.writeable else x.copy()), True
    if isinstance(x, (list, tuple)):
        return torch.from_numpy(np.asarray(x)), True
    raise ValueError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _back(t: torch.Tensor, to_numpy: bool) -> np.ndarray | torch.Tensor:
    return t.numpy() if to_numpy else t


def _check_boxes(t: torch.Tensor, name: str) -> None:
    if t.ndim != 2 or t.shape[1] != 4 or not t.is_floating_point():
        raise ValueError(
            f"{name}: expected floating [N, 4] xyxy boxes, got {t.dtype} {list(t.shape)}"
        )


def _check_padding(padding: int) -> None:
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding: expected a non-negative int, got {padding!r}")
