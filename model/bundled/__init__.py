"""The bundled default model: the lite variant trained on the built-in synthetic scenes.

Weights stored as fp16 (loading casts them back to fp32); trained by
`maskstream train --config configs/train/synthetic_lite.yaml` (figures in
benchmarks/results/train_synthetic_lite.json).
"""
from importlib.resources import files
from pathlib import Path

from maskstream.configs import CONFIG_DIR

BUNDLED_CHECKPOINT = Path(str(files(__name__) / "lite_shapes.pt"))
BUNDLED_CONFIG = CONFIG_DIR / "model_lite_shapes.yaml"
