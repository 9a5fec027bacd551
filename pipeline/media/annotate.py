"""Drawing detections onto frames for humans to look at (annotated PNGs and videos)."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np

MASK_ALPHA = 0.45


def label_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    class_names: Sequence[str] = (),
) -> np.ndarray:
    """image uint8 [H, W, 3] RGB; boxes [N, 4]; masks: N full-frame bool/uint8 [H, W] -> new image."""
    out = image.astype(np.float32)
    for mask, label in zip(masks, labels):
        tint = np.array(label_color(int(label)), dtype=np.float32)
        m = np.asarray(mask).astype(bool)
        out[m] = (1 - MASK_ALPHA) * out[m] + MASK_ALPHA * tint
    out_u8 = out.round().clip(0, 255).astype(np.uint8)
    for box, label, score in zip(boxes, labels, scores):
        color = label_color(int(label))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(out_u8, (x1, y1), (x2, y2), color, 2)
        name = class_names[int(label)] if int(label) < len(class_names) else f"class_{int(label)}"
        text = f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        # Keep the label inside the frame: a box at the right or top edge would cut it off.
        y_text = max(y1, th + base)
        x_text = max(0, min(x1, out_u8.shape[1] - tw))
        cv2.rectangle(out_u8, (x_text, y_text - th - base), (x_text + tw, y_text), color, -1)
        cv2.putText(out_u8, text, (x_text, y_text - base), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return out_u8
