"""Real Detections messages for the client/output tests: masks drawn on a grid, RLE-encoded
the way the postprocess stage does it (box-cropped COCO RLE)."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Header, StageStamp

FRAME_HW = (120, 160)
CLASS_NAMES = ("__background__", "square", "disc")


def full_masks(seq: int, frame_hw: tuple[int, int] = FRAME_HW) -> np.ndarray:
    """uint8 [2, H, W]: a square and a disc that move with seq."""
    h, w = frame_hw
    ys, xs = np.mgrid[0:h, 0:w]
    square = np.zeros((h, w), np.uint8)
    x0 = 10 + 3 * (seq % 20)
    square[30:70, x0 : x0 + 40] = 1
    disc = ((xs - (w - 40)) ** 2 + (ys - (h // 2 + seq % 10)) ** 2 < 20**2).astype(np.uint8)
    return np.stack([square, disc])


def make_detections(stream_id: str, seq: int, frame_hw: tuple[int, int] = FRAME_HW) -> tuple[Detections, np.ndarray]:
    """(Detections of frame seq, its full-frame masks uint8 [N, H, W])."""
    masks = full_masks(seq, frame_hw)
    boxes, crop_boxes, counts = [], [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        crop_boxes.append((x0, y0, x1, y1))
        boxes.append((x0 + 0.25, y0 + 0.5, x1 - 0.25, y1 - 0.5))
        counts.append(mask_utils.encode(np.asfortranarray(m[y0:y1, x0:x1]))["counts"])
    header = Header(
        stream_id,
        seq,
        pts_s=seq / 10,
        stamps=(StageStamp("decode", 1.0 + seq, 1.001 + seq),),
        drops=(("decode", 0),),
    )
    det = Detections(
        header=header,
        frame_hw=frame_hw,
        boxes=np.array(boxes, np.float32),
        scores=np.array([0.9, 0.75], np.float32),
        labels=np.array([1, 2], np.int32),
        class_names=(CLASS_NAMES[1], CLASS_NAMES[2]),
        crop_boxes=np.array(crop_boxes, np.int32),
        rle_counts=tuple(counts),
    )
    return det, masks


def end_of_stream(stream_id: str, frames: int, error: str = "") -> EndOfStream:
    return EndOfStream(Header(stream_id, frames), error=error)
