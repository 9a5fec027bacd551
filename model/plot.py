"""The training loss curves as a PNG, drawn with matplotlib (Agg: no display needed)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average; the first points average what exists so far."""
    v = np.asarray(values, np.float64)
    if window <= 1 or v.size == 0:
        return v
    sums = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def new_figure(width_in: float = 8.0, height_in: float = 4.5) -> Figure:
    """A figure on the Agg canvas, not pyplot's: nothing global, no GUI backend chosen behind the
    caller's back (matplotlib is imported here, not at start-up: it costs a noticeable import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def write_loss_plot(
    path: str | Path,
    iterations: Sequence[int],
    series: Mapping[str, Sequence[float]],
    title: str = "training losses (moving average, log scale)",
) -> Path:
    """PNG of each series against iteration, log-scaled y, smoothed over ~1/50 of the run."""
    x = np.asarray(iterations, np.float64)
    window = max(1, len(x) // 50)
    figure = new_figure()
    axes = figure.add_subplot()
    for name, values in series.items():
        curve = smooth(values, window)
        positive = curve > 0  # a log axis cannot show 0
        axes.plot(x[positive], curve[positive], label=name, linewidth=1.2)
    axes.set_yscale("log")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    if series:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    return save(figure, path)
