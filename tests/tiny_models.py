"""Small model configs several test modules share: they keep a CPU forward or a training
iteration at a fraction of a second."""
from __future__ import annotations

import dataclasses

from maskstream.model.config import ModelConfig, RoIHeadsConfig, RPNConfig, StaticGraphConfig, TransformConfig
from maskstream.model.engine import EngineManifest
from maskstream.model.mask_rcnn import default_config

# The runners' static graph: two frames of 128x160, ten detections each.
SHAPE = StaticGraphConfig(batch=2, height=128, width=160, detections=10)


def tiny_runner_config() -> ModelConfig:
    """The lite variant at SHAPE, its untrained heads' detections kept (the runner and stage tests)."""
    cfg = default_config("lite")
    return dataclasses.replace(
        cfg,
        static=SHAPE,
        # Untrained heads score every class about 1/91; a zero threshold keeps detections flowing.
        roi_heads=dataclasses.replace(cfg.roi_heads, score_thresh=0.0, detections_per_img=SHAPE.detections),
        rpn=dataclasses.replace(cfg.rpn, pre_nms_top_n_test=200, post_nms_top_n_test=100),
    )


def tiny_manifest(**changes) -> EngineManifest:
    """The manifest of an engine built from tiny_runner_config (fp16), with `changes` applied."""
    cfg = tiny_runner_config()
    fields = dict(
        input_shape=(2, 3, 128, 160),
        input_dtype="uint8",
        image_sizes_shape=(2, 2),
        image_sizes_dtype="int64",
        input_bindings=("images", "image_sizes"),
        output_bindings=tuple(f"output{i}" for i in range(5)),
        precision="fp16",
        detections=10,
        num_classes=91,
        class_names=("__background__", "person"),
        image_mean=cfg.transform.image_mean,
        image_std=cfg.transform.image_std,
        tensorrt_version="11.0.0.114",
        torch_tensorrt_version="2.13.0",
        plugin_version=1,
        checkpoint_sha256="ab" * 32,
        config={"variant": "lite", "rpn": {"aspect_ratios": [0.5, 1.0, 2.0]}},
    )
    fields.update(changes)
    return EngineManifest(**fields)  # type: ignore[arg-type]


# A lite model small enough that a training iteration on 128x128 scenes takes a fraction of a
# second (the training and evaluation tests).
TINY_MODEL = ModelConfig(
    variant="lite",
    num_classes=5,
    fpn_channels=32,
    box_representation=64,
    transform=TransformConfig(min_size=128, max_size=128),
    rpn=RPNConfig(
        anchor_sizes=(16, 32, 64, 128, 256),
        pre_nms_top_n_train=200,
        post_nms_top_n_train=100,
        pre_nms_top_n_test=100,
        post_nms_top_n_test=50,
        batch_size_per_image=64,
    ),
    roi_heads=RoIHeadsConfig(batch_size_per_image=32, detections_per_img=10),
    static=StaticGraphConfig(height=128, width=128, detections=10),
)


def tiny_infer_stage(overlap: bool | None = False, crops: bool = False):
    """The inference stage on the tiny runner, CPU, seeded (the stage tests and the hostile-input tests);
    crops: it sends the masks' binary crops (infer.masks crops), not their probabilities."""
    from maskstream.model.contract import InferenceContract
    from maskstream.pipeline.stages.infer import InferConfig, InferStage, RunnerSpec

    config = tiny_runner_config()
    return InferStage(InferConfig(RunnerSpec(config=config, device="cpu", seed=0),
                                  InferenceContract.from_model_config(config), overlap=overlap, crops=crops))


def tiny_model_input(stream: str, seq: int):
    """A ModelInput of SHAPE with random pixels and a valid width shrinking by 8 per seq."""
    import numpy as np
    from maskstream.pipeline.runtime.messages import Header, ModelInput

    image = np.random.default_rng(seq).integers(0, 256, (3, SHAPE.height, SHAPE.width), dtype=np.uint8)
    return ModelInput(Header(stream, seq), image, (SHAPE.height, SHAPE.width - 8 * seq), (240, 320))
