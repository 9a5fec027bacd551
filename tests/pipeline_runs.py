"""What the multi-process tests (test_pipeline, test_bench) share: the checkout they run
`maskstream` from, a tiny untrained model as `--set` overrides, and the latency bounds."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_SETS = [
    "model.static.height=128", "model.static.width=160", "model.static.detections=5",
    "model.roi_heads.detections_per_img=5", "model.roi_heads.score_thresh=0.0",
    "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=50",
    "model.config=" + str(ROOT / "configs" / "model_lite.yaml"), "infer.threads=1",
]
INFER_STALENESS_S = 1.0  # configs/pipeline.yaml infer.staleness_s
# After the staleness check a frame still goes through inference, postprocess and publish:
# ~0.1-0.3 s each for the tiny model on a loaded 2-core box. Generous, yet far below a backlog.
AFTER_INFERENCE_S = 2.0
STAGES = ("decode", "preprocess", "infer", "postprocess", "publish")
