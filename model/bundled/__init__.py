"""The bundled default model: the lite variant trained on the built-in synthetic scenes.

Weights stored as fp16 (loading casts them back to fp32); trained by
`maskstream train --config configs/train/synthetic_lite.yaml` (figures in
benchmarks/results/train_synthetic_lite.json).
"""
from pathlib import Path

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "lite_shapes.pt"
BUNDLED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model_lite_shapes.yaml"
