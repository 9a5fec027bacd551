"""`maskstream bench`'s PNG plots, drawn with OpenCV as model.plot draws the loss curves (the
project has no plotting library): end-to-end latency histogram, throughput over time, and the
per-stage time breakdown of one run."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from maskstream.model.plot import PALETTE

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK, _GRID, _GREY = (0, 0, 0), (225, 225, 225), (170, 170, 170)
_SIZE = (760, 420)
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 30, 60, 50


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to at least high."""
    high = high if high > 0 else 1.0
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def _label(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _text(canvas: np.ndarray, text: str, at: tuple[int, int], scale: float = 0.42,
          colour: tuple[int, int, int] = _BLACK) -> None:
    cv2.putText(canvas, text, at, _FONT, scale, colour, 1, cv2.LINE_AA)


class _Axes:
    """A white canvas with a frame, y grid and tick labels, mapping data to pixels."""

    def __init__(self, title: str, xlabel: str, ylabel: str, x_max: float, y_max: float):
        w, h = _SIZE
        self.canvas = np.full((h, w, 3), 255, np.uint8)
        self.xticks, self.yticks = nice_ticks(x_max), nice_ticks(y_max)
        self.x_max, self.y_max = self.xticks[-1], self.yticks[-1]
        self.x0, self.x1, self.y0, self.y1 = _LEFT, w - _RIGHT, h - _BOTTOM, _TOP
        for v in self.yticks:
            y = self.py(v)
            cv2.line(self.canvas, (self.x0, y), (self.x1, y), _GRID, 1)
            _text(self.canvas, _label(v), (8, y + 4))
        for v in self.xticks:
            x = self.px(v)
            cv2.line(self.canvas, (x, self.y0), (x, self.y0 + 4), _BLACK, 1)
            _text(self.canvas, _label(v), (x - 10, self.y0 + 18))
        cv2.rectangle(self.canvas, (self.x0, self.y1), (self.x1, self.y0), _BLACK, 1)
        _text(self.canvas, title, (self.x0, 24), 0.5)
        _text(self.canvas, xlabel, ((self.x0 + self.x1) // 2 - 4 * len(xlabel), h - 12))
        _text(self.canvas, ylabel, (8, self.y1 - 10))

    def px(self, x: float) -> int:
        return int(round(self.x0 + x / self.x_max * (self.x1 - self.x0)))

    def py(self, y: float) -> int:
        return int(round(self.y0 - y / self.y_max * (self.y0 - self.y1)))

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), self.canvas):
            raise OSError(f"{path}: could not write the plot")
        return path


def latency_histogram(path: Path, seconds: Sequence[float], title: str) -> Path:
    """Histogram of end-to-end latencies (ms) with the p50/p95/p99 marked."""
    ms = np.asarray(seconds, np.float64) * 1000
    top = float(ms.max()) * 1.05 if ms.size else 1.0
    bins = max(5, min(40, int(math.sqrt(ms.size)) * 2)) if ms.size else 5
    counts, edges = np.histogram(ms, bins=bins, range=(0.0, nice_ticks(top)[-1]))
    axes = _Axes(title, "end-to-end latency (ms)", "frames", float(edges[-1]), float(max(counts.max(), 1)))
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        if count:
            cv2.rectangle(axes.canvas, (axes.px(lo) + 1, axes.py(count)), (axes.px(hi) - 1, axes.y0 - 1),
                          PALETTE[1], -1)
    if ms.size:
        for i, (name, q) in enumerate(zip(("p50", "p95", "p99"), np.percentile(ms, [50, 95, 99]))):
            x = axes.px(float(q))
            colour = PALETTE[(2, 3, 4)[i]]
            cv2.line(axes.canvas, (x, axes.y1), (x, axes.y0), colour, 1, cv2.LINE_AA)
            # the legend above the frame, where no bar can hide it
            _text(axes.canvas, f"{name} {q:.0f} ms", (axes.x0 + 150 * i, 46), 0.45, colour)
    return axes.write(path)


def throughput_over_time(path: Path, t_s: Sequence[float], fps: Sequence[float], mean_fps: float | None,
                         title: str) -> Path:
    """Published frames/s against seconds since the first published frame."""
    t, f = np.asarray(t_s, np.float64), np.asarray(fps, np.float64)
    axes = _Axes(title, "seconds since the first published frame", "frames/s",
                 float(t.max()) if t.size else 1.0, float(max(f.max() if f.size else 0.0, mean_fps or 0.0)) * 1.1)
    if t.size > 1:
        points = np.stack([[axes.px(x) for x in t], [axes.py(y) for y in f]], axis=1).astype(np.int32)
        cv2.polylines(axes.canvas, [points], False, PALETTE[1], 2, cv2.LINE_AA)
    for x, y in zip(t, f):
        cv2.circle(axes.canvas, (axes.px(x), axes.py(y)), 3, PALETTE[1], -1, cv2.LINE_AA)
    if mean_fps:
        y = axes.py(mean_fps)
        for x in range(axes.x0, axes.x1, 12):
            cv2.line(axes.canvas, (x, y), (min(x + 6, axes.x1), y), PALETTE[3], 1)
        _text(axes.canvas, f"overall {mean_fps:.2f} frames/s", (axes.x1 - 190, y - 6), 0.42, PALETTE[3])
    return axes.write(path)


def stage_breakdown(path: Path, breakdown_s: dict[str, float], title: str) -> Path:
    """Horizontal bars, in pipeline order: each stage's mean time and the queue wait before it
    (they add up to the mean end-to-end latency)."""
    w = _SIZE[0]
    rows = list(breakdown_s.items())
    h = _TOP + 30 + 24 * len(rows) + 40
    canvas = np.full((h, w, 3), 255, np.uint8)
    left, right = 170, w - 110
    top_ms = nice_ticks(max([v * 1000 for _, v in rows] + [1e-3]))[-1]
    _text(canvas, title, (12, 24), 0.5)
    for i, (name, seconds) in enumerate(rows):
        y = _TOP + 20 + 24 * i
        wait = name.startswith("wait:")
        colour = _GREY if wait else PALETTE[(1 + STAGE_COLOURS.get(name, 0)) % len(PALETTE)]
        label = f"queue before {name[5:]}" if wait else "decode (send)" if name == "decode" else name
        _text(canvas, label, (12, y + 12), 0.42, (90, 90, 90) if wait else _BLACK)
        width = int(round(max(seconds, 0.0) * 1000 / top_ms * (right - left)))
        cv2.rectangle(canvas, (left, y), (left + max(width, 1), y + 16), colour, -1)
        _text(canvas, f"{seconds * 1000:.1f} ms", (left + width + 6, y + 12))
    total = sum(breakdown_s.values())
    _text(canvas, f"sum = mean end-to-end {total * 1000:.1f} ms", (left, h - 12))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"{path}: could not write the plot")
    return path


STAGE_COLOURS = {"decode": 0, "preprocess": 1, "infer": 2, "postprocess": 3, "publish": 4}


def write_plots(stem: Path, summary: dict[str, Any], label: str) -> list[Path]:
    """The three plots of one summarize() dict: STEM_latency.png, STEM_throughput.png, STEM_stages.png."""
    paths = [
        latency_histogram(stem.with_name(stem.name + "_latency.png"), summary["end_to_end_values_s"],
                          f"{label}: end-to-end latency, {len(summary['end_to_end_values_s'])} frames"),
        throughput_over_time(stem.with_name(stem.name + "_throughput.png"), summary["timeline"]["t_s"],
                             summary["timeline"]["fps"], summary["throughput_fps"],
                             f"{label}: throughput (each point: the last {summary['timeline']['window_frames']} "
                             "frames)"),
    ]
    if summary["breakdown_mean_s"]:
        paths.append(stage_breakdown(stem.with_name(stem.name + "_stages.png"), summary["breakdown_mean_s"],
                                     f"{label}: where a frame's time goes (mean per frame)"))
    return paths
