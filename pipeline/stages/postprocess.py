"""postprocess: `RawDetections` -> `Detections`: boxes back to frame pixels, masks pasted into
their boxes and cut to the frame, box-cropped COCO RLE (full-frame masks never travel); labels
named by the run's `InferenceContract` (model.contract), the one the runner is checked against.
Where the inference process pasted the masks itself (infer.masks: crop_boxes and crop_bits instead
of mask_probs), their crops are encoded as they come, with no paste here."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from maskstream.model.contract import InferenceContract
from maskstream.model.rle import encode_box_cropped_rle, encode_crop_rle
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Message, RawDetections
from maskstream.pipeline.runtime.stage import Stage, Wiring, run_stage


@dataclass(frozen=True)
class PostprocessConfig:
    contract: InferenceContract  # its class_names name the labels (index = label)
    mask_threshold: float = 0.5


def rescale_boxes(boxes: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """float32 [N, 4] xyxy boxes in an image of `from_hw` -> the same boxes in `to_hw`: torchvision's
    `resize_boxes` (model.postprocess.rescale_boxes) in numpy, the same float32 ratios and products,
    so that this process needs no torch."""
    return boxes * box_ratios(from_hw, to_hw)  # [N, 4]


def box_ratios(from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """float32 [4] what rescale_boxes multiplies each xyxy box by: the inference process scales its
    boxes on the device with these (infer.masks crops), the same float32 products."""
    ratio_h = np.float32(to_hw[0]) / np.float32(from_hw[0])
    ratio_w = np.float32(to_hw[1]) / np.float32(from_hw[1])
    return np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)


class PostprocessStage(Stage):
    def __init__(self, config: PostprocessConfig):
        self.config = config

    def process(self, message: Message) -> Message:
        if isinstance(message, EndOfStream):
            return message
        if not isinstance(message, RawDetections):
            raise TypeError(f"expected RawDetections or EndOfStream, got {type(message).__name__}")
        frame_hw = message.frame_hw
        boxes = rescale_boxes(np.asarray(message.boxes, dtype=np.float32), message.valid_hw, frame_hw)  # [N, 4]
        if message.mask_probs is None:  # pasted and thresholded by the inference process
            assert message.crop_boxes is not None and message.crop_bits is not None  # messages.decode checked them
            crops, counts = message.crop_boxes, list(_crop_counts(message.crop_boxes, message.crop_bits))
        else:
            crops, counts = np.zeros((len(boxes), 4), dtype=np.int32), []
            for i, (probs, box) in enumerate(zip(message.mask_probs, boxes)):
                rle, crops[i] = encode_box_cropped_rle(probs, box, frame_hw, self.config.mask_threshold)
                counts.append(rle["counts"].encode("ascii"))
        names = self.config.contract.class_names
        labels = message.labels.astype(np.int32)
        return Detections(
            message.header, frame_hw, boxes, message.scores.astype(np.float32), labels,
            tuple(names[label] if 0 <= label < len(names) else f"class_{label}" for label in labels.tolist()),
            crops, tuple(counts),
        )


def _crop_counts(crop_boxes: np.ndarray, crop_bits: np.ndarray) -> Iterator[bytes]:
    """The RLE counts of each crop that crop_bits packs (RawDetections' layout)."""
    heights = (crop_boxes[:, 3] - crop_boxes[:, 1]).tolist()
    widths = (crop_boxes[:, 2] - crop_boxes[:, 0]).tolist()
    pixels = np.unpackbits(crop_bits, count=sum(h * w for h, w in zip(heights, widths))).view(bool)
    start = 0
    for (x0, y0, _, _), h, w in zip(crop_boxes.tolist(), heights, widths):
        rle, _ = encode_crop_rle(pixels[start : start + h * w].reshape(h, w), (x0, y0))
        start += h * w
        yield rle["counts"].encode("ascii")


def main(config: PostprocessConfig, wiring: Wiring) -> None:
    run_stage(lambda: PostprocessStage(config), wiring)
