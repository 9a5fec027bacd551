"""Drawing detections onto frames for humans to look at (annotated PNGs and videos).

Made to be read on real footage: a mask is a translucent fill plus an outline in its class
colour over a dark rim, so it stands out on grass as on asphalt; lines and text scale with the
frame (a 1080p frame gets thicker lines and bigger text than a 480p one); labels are placed
where they hide no other label, highest score first.
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np

MASK_ALPHA = 0.4
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_REFERENCE_SIDE = 480  # the short side at which lines are 1-2 px and text 0.5 scale


def label_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def drawing_scale(frame_hw: tuple[int, int]) -> tuple[int, float]:
    """(line thickness in pixels, font scale) for a frame: proportional to its short side."""
    factor = min(frame_hw) / _REFERENCE_SIDE
    return max(1, round(2 * factor)), max(0.4, 0.5 * factor)


Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 (ends exclusive)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(sizes: Sequence[tuple[int, int]], boxes: np.ndarray, frame_hw: tuple[int, int]) -> list[Rect]:
    """Where each label goes: a (w, h) rectangle per box, in the order given (highest priority
    first), none over an earlier one and all inside the frame. Tried in turn: above the box's
    top-left corner, inside it, below it; then stepping down from the first until free."""
    height, width = frame_hw
    placed: list[Rect] = []
    for (w, h), box in zip(sizes, boxes):
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x = max(0, min(x0, width - w))

        def at(y: int, x: int = x, w: int = w, h: int = h) -> Rect:
            y = max(0, min(y, height - h))
            return x, y, x + w, y + h

        candidates = [at(y0 - h), at(y0), at(y1)]
        candidates += [at(y0 - h + step * h) for step in range(1, max(1, height // max(h, 1)) + 1)]
        free = next((c for c in candidates if not any(_overlaps(c, p) for p in placed)), candidates[0])
        placed.append(free)
    return placed


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    class_names: Sequence[str] = (),
) -> np.ndarray:
    """image uint8 [H, W, 3] RGB; boxes [N, 4]; masks: N full-frame bool/uint8 [H, W] -> new image."""
    frame_hw = (int(image.shape[0]), int(image.shape[1]))
    thickness, font_scale = drawing_scale(frame_hw)
    out = image.astype(np.float32)
    binary = [np.asarray(mask).astype(bool) for mask in masks]
    for m, label in zip(binary, labels):
        tint = np.array(label_color(int(label)), dtype=np.float32)
        out[m] = (1 - MASK_ALPHA) * out[m] + MASK_ALPHA * tint
    out_u8 = out.round().clip(0, 255).astype(np.uint8)
    outline = max(2, thickness)  # a 1-pixel line antialiased into the fill is too faint to see
    for m, label in zip(binary, labels):  # outlines after every fill, so no fill dims another's edge
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out_u8, contours, -1, (0, 0, 0), outline + 4, cv2.LINE_AA)
        cv2.drawContours(out_u8, contours, -1, label_color(int(label)), outline, cv2.LINE_AA)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    texts, sizes = [], []
    for i in order:
        label = int(labels[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(out_u8, (x1, y1), (x2, y2), label_color(label), thickness)
        name = class_names[label] if label < len(class_names) else f"class_{label}"
        text = f"{name} {float(scores[i]):.2f}"
        (tw, th), base = cv2.getTextSize(text, _FONT, font_scale, max(1, thickness // 2))
        texts.append(text)
        sizes.append((tw + 2 * thickness, th + base + thickness))
    rects = place_labels(sizes, np.asarray(boxes)[order] if len(order) else np.zeros((0, 4)), frame_hw)
    for i, text, (x0, y0, x1, y1) in zip(order, texts, rects):  # labels last: no box line crosses one
        color = label_color(int(labels[i]))
        cv2.rectangle(out_u8, (x0, y0), (x1 - 1, y1 - 1), color, -1)
        (_, th), base = cv2.getTextSize(text, _FONT, font_scale, max(1, thickness // 2))
        cv2.putText(out_u8, text, (x0 + thickness, y0 + th + thickness // 2), _FONT, font_scale, _text_color(color),
                    max(1, thickness // 2), cv2.LINE_AA)
    return out_u8
