"""What the multi-process tests (test_pipeline, test_bench) share: the checkout they run
`maskstream` from, a tiny untrained model as `--set` overrides, and the latency bounds."""
from __future__ import annotations

from pathlib import Path

from maskstream.pipeline.bench.smoke import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_SETS = tiny_run_overrides()  # the benchmarks' tiny model (pipeline/bench/smoke.py)
INFER_STALENESS_S = 1.0  # configs/pipeline.yaml infer.staleness_s
# After the staleness check a frame still goes through inference, postprocess and publish:
# ~0.1-0.3 s each for the tiny model on a loaded 2-core box. Generous, yet far below a backlog.
AFTER_INFERENCE_S = 2.0
STAGES = ("decode", "preprocess", "infer", "postprocess", "publish")
