"""`maskstream bench`'s PNG plots, drawn with matplotlib (model.plot's Agg figures): end-to-end
latency histogram, throughput over time, and the per-stage time breakdown of one run."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from maskstream.model.plot import new_figure, save

# pipeline order; queue waits are drawn grey before the stage they wait for
STAGE_ORDER = ("decode", "preprocess", "infer", "postprocess", "publish")


def latency_histogram(path: Path, seconds: Sequence[float], title: str) -> Path:
    """Histogram of end-to-end latencies (ms) with the p50/p95/p99 marked."""
    ms = np.asarray(seconds, np.float64) * 1000
    figure = new_figure()
    axes = figure.add_subplot()
    if ms.size:
        axes.hist(ms, bins=max(5, min(40, int(np.sqrt(ms.size)) * 2)), color="tab:blue", alpha=0.8)
        for (name, q), colour in zip(zip(("p50", "p95", "p99"), np.percentile(ms, [50, 95, 99])),
                                     ("tab:green", "tab:orange", "tab:red")):
            axes.axvline(float(q), color=colour, linewidth=1.2, label=f"{name} {q:.0f} ms")
        # outside the axes, where no bar can hide it
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    axes.set_xlim(left=0)
    axes.set_xlabel("end-to-end latency (ms)")
    axes.set_ylabel("frames")
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    return save(figure, path)


def throughput_over_time(path: Path, t_s: Sequence[float], fps: Sequence[float], mean_fps: float | None,
                         title: str) -> Path:
    """Published frames/s against seconds since the first published frame."""
    figure = new_figure()
    axes = figure.add_subplot()
    axes.plot(np.asarray(t_s, np.float64), np.asarray(fps, np.float64), marker="o", markersize=3,
              color="tab:blue", label="frames/s")
    if mean_fps:
        axes.axhline(mean_fps, color="tab:red", linestyle="--", linewidth=1, label=f"overall {mean_fps:.2f} frames/s")
    axes.set_ylim(bottom=0)
    axes.set_xlabel("seconds since the first published frame")
    axes.set_ylabel("frames/s")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    return save(figure, path)


def stage_breakdown(path: Path, breakdown_s: dict[str, float], title: str) -> Path:
    """Horizontal bars, in pipeline order: each stage's mean time and the queue wait before it
    (they add up to the mean end-to-end latency)."""
    rows = list(breakdown_s.items())
    figure = new_figure(8.0, 1.2 + 0.32 * len(rows))
    axes = figure.add_subplot()
    labels, values, colours = [], [], []
    for name, seconds in rows:
        wait = name.startswith("wait:")
        labels.append(f"queue before {name[5:]}" if wait else "decode (send)" if name == "decode" else name)
        values.append(max(seconds, 0.0) * 1000)
        stage = name[5:] if wait else name
        colours.append("0.75" if wait else f"C{STAGE_ORDER.index(stage) if stage in STAGE_ORDER else 5}")
    bars = axes.barh(range(len(rows)), values, color=colours)
    axes.bar_label(bars, labels=[f"{v:.1f} ms" for v in values], padding=3, fontsize="small")
    axes.set_yticks(range(len(rows)), labels)
    axes.invert_yaxis()  # the first stage on top
    axes.set_xlabel(f"ms per frame (sum = mean end-to-end {sum(breakdown_s.values()) * 1000:.1f} ms)")
    axes.set_title(title)
    axes.margins(x=0.15)
    return save(figure, path)


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
