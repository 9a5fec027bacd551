"""postprocess: `RawDetections` -> `Detections`: boxes back to frame pixels, masks pasted into
their boxes and cut to the frame, box-cropped COCO RLE (full-frame masks never travel)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from maskstream.model.postprocess import encode_box_cropped_rle, rescale_boxes
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Message, RawDetections
from maskstream.pipeline.runtime.stage import Wiring, run_stage


@dataclass(frozen=True)
class PostprocessConfig:
    class_names: tuple[str, ...]  # index = label
    mask_threshold: float = 0.5


class PostprocessStage:
    def __init__(self, config: PostprocessConfig):
        self.config = config

    def process(self, message: Message) -> Message:
        if isinstance(message, EndOfStream):
            return message
        if not isinstance(message, RawDetections):
            raise TypeError(f"expected RawDetections or EndOfStream, got {type(message).__name__}")
        frame_hw = message.frame_hw
        boxes = rescale_boxes(np.asarray(message.boxes, dtype=np.float32), message.valid_hw, frame_hw)  # [N, 4]
        crops, counts = np.zeros((len(boxes), 4), dtype=np.int32), []
        for i, (probs, box) in enumerate(zip(message.mask_probs, boxes)):
            rle, crops[i] = encode_box_cropped_rle(probs, box, frame_hw, self.config.mask_threshold)
            counts.append(rle["counts"].encode("ascii"))
        names = self.config.class_names
        labels = message.labels.astype(np.int32)
        return Detections(
            message.header, frame_hw, boxes, message.scores.astype(np.float32), labels,
            tuple(names[label] if 0 <= label < len(names) else f"class_{label}" for label in labels.tolist()),
            crops, tuple(counts),
        )


def main(config: PostprocessConfig, wiring: Wiring) -> None:
    run_stage(lambda: PostprocessStage(config), wiring)
