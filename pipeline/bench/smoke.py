"""The tiny model and sizes a benchmark's `--smoke` runs at (benchmarks/*.py and `maskstream bench
--smoke`), and the tiny model the multi-process tests and the fleet benchmark run (one setting for
them all): the code paths of a full run, small enough that CI runs every benchmark in seconds on a
CPU, so that one broken by a change elsewhere fails there and not in front of the next person
measuring. Figures measured at these sizes mean nothing; smoke results never go into
benchmarks/results/."""
from __future__ import annotations

from pathlib import Path

from maskstream.configs import CONFIG_DIR

__all__ = ["SMOKE_FRAMES", "TINY_MODEL", "TINY_MODEL_CONFIG", "tiny_run_overrides"]

SMOKE_FRAMES = 6  # frames per stream: past the first (lazy set-up), enough for a rate between frames
TINY_MODEL_CONFIG: Path = CONFIG_DIR / "model_lite.yaml"
# Model config overrides of TINY_MODEL_CONFIG: the lite variant at 128x160 with 5 detection slots
# and few proposals; every detection kept (score_thresh 0), so that an untrained model's frames
# carry masks and their count does not hang on its scores.
TINY_MODEL: tuple[str, ...] = (
    "static.height=128", "static.width=160", "static.detections=5", "roi_heads.detections_per_img=5",
    "roi_heads.score_thresh=0.0", "rpn.pre_nms_top_n_test=100", "rpn.post_nms_top_n_test=50",
)


def tiny_run_overrides() -> list[str]:
    """The tiny model as `maskstream run`/`bench`/`node` --set items (RunConfig keys), with one
    inference thread: its runs share a few cores with each other (tests, a fleet node's pipelines)."""
    return [f"model.config={TINY_MODEL_CONFIG}", *(f"model.{item}" for item in TINY_MODEL), "infer.threads=1"]
