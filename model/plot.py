"""Line plots drawn with OpenCV (the project has no plotting library): the loss curves."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

# BGR colours, distinguishable on white
PALETTE = ((40, 40, 40), (200, 110, 30), (40, 160, 40), (40, 40, 210), (170, 60, 170), (30, 170, 200), (120, 120, 0))


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average; the first points average what exists so far."""
    v = np.asarray(values, np.float64)
    if window <= 1 or v.size == 0:
        return v
    sums = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def write_loss_plot(
    path: str | Path,
    iterations: Sequence[int],
    series: Mapping[str, Sequence[float]],
    size: tuple[int, int] = (720, 420),
    title: str = "training losses (moving average, log scale)",
) -> Path:
    """PNG of each series against iteration, log-scaled y, smoothed over ~1/50 of the run."""
    w, h = size
    left, right, top, bottom = 60, 190, 30, 40
    canvas = np.full((h, w, 3), 255, np.uint8)
    x = np.asarray(iterations, np.float64)
    window = max(1, len(x) // 50)
    curves = {name: smooth(vals, window) for name, vals in series.items()}
    positive = np.concatenate([c[c > 0] for c in curves.values()] + [np.array([1e-3])])
    lo, hi = math.log10(max(positive.min(), 1e-4)), math.log10(positive.max())
    lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    x0, x1 = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1

    def to_px(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        px = left + (xs - x0) / (x1 - x0) * (w - left - right)
        py = top + (hi - np.log10(np.maximum(ys, 10.0**lo))) / (hi - lo) * (h - top - bottom)
        return np.stack([px, py], axis=1).round().astype(np.int32)  # [P, 2]

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(canvas, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    for decade in range(lo, hi + 1):
        y = int(round(top + (hi - decade) / (hi - lo) * (h - top - bottom)))
        cv2.line(canvas, (left, y), (w - right, y), (225, 225, 225), 1)
        cv2.putText(canvas, f"1e{decade}", (8, y + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for frac in (0.0, 0.5, 1.0):
        xv = x0 + frac * (x1 - x0)
        px = int(left + frac * (w - left - right))
        cv2.putText(canvas, f"{xv:.0f}", (px - 12, h - bottom + 16), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "iteration", ((w - right + left) // 2 - 30, h - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, title, (left, 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (name, curve) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        if x.size:
            cv2.polylines(canvas, [to_px(x, curve)], False, colour, 1, cv2.LINE_AA)
        ly = top + 14 + 18 * i
        cv2.line(canvas, (w - right + 10, ly - 4), (w - right + 30, ly - 4), colour, 2)
        cv2.putText(canvas, name, (w - right + 36, ly), font, 0.4, colour, 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"{path}: could not write the plot")
    return path
