"""preprocess: `Frame` -> `ModelInput`: resize (aspect kept) and pad to the runner's fixed input.

The input size and the pad colour come from the run's `InferenceContract` (model.contract), the
one the runner is checked against. uint8 all the way; the pad colour is the mean colour, which
the graph normalises to about zero, like the eager path's zero padding after normalisation. A yuv420p frame's planes
are shrunk first and only the small picture is converted to RGB (pipeline.media.pixels).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from maskstream.model.contract import InferenceContract
from maskstream.pipeline.media.pixels import PLANAR, RGB24, fit_size, yuv420p_frame_hw, yuv420p_to_rgb_resized
from maskstream.pipeline.runtime.messages import EndOfStream, Frame, Message, ModelInput
from maskstream.pipeline.runtime.stage import Stage, Wiring, run_stage


@dataclass(frozen=True)
class PreprocessConfig:
    contract: InferenceContract  # pads to its (H, W) with its pad_rgb


def fit_to_input(image: np.ndarray, input_hw: tuple[int, int], pad_rgb: tuple[int, int, int],
                 pixel_format: str = RGB24) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H, W, 3] RGB (or yuv420p planes) -> (uint8 [3, h, w] RGB resized into the top-left
    corner, padded; valid (h, w))."""
    in_h, in_w = input_hw
    valid = fit_size(frame_hw(image, pixel_format), input_hw)
    # INTER_AREA would alias less when shrinking, but bilinear is what the eager path uses.
    if pixel_format in PLANAR:
        resized = yuv420p_to_rgb_resized(image, valid, pixel_format)  # [h, w, 3]
    else:
        resized = cv2.resize(image, (valid[1], valid[0]), interpolation=cv2.INTER_LINEAR)  # [h, w, 3]
    out = np.empty((3, in_h, in_w), dtype=np.uint8)
    out[:] = np.asarray(pad_rgb, dtype=np.uint8)[:, None, None]
    out[:, : valid[0], : valid[1]] = resized.transpose(2, 0, 1)  # [3, h, w]
    return out, valid


def frame_hw(image: np.ndarray, pixel_format: str) -> tuple[int, int]:
    if image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8, got {image.dtype}")
    if pixel_format in PLANAR:
        return yuv420p_frame_hw(image)
    if pixel_format != RGB24 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3] rgb24 or yuv420p/yuvj420p planes, got {pixel_format} "
                         f"{list(image.shape)}")
    return int(image.shape[0]), int(image.shape[1])


class PreprocessStage(Stage):
    def __init__(self, config: PreprocessConfig):
        self.config = config

    def process(self, message: Message) -> Message:
        if isinstance(message, EndOfStream):
            return message
        if not isinstance(message, Frame):
            raise TypeError(f"expected Frame or EndOfStream, got {type(message).__name__}")
        contract = self.config.contract
        image, valid = fit_to_input(message.image, contract.input_hw, contract.pad_rgb, message.pixel_format)
        return ModelInput(message.header, image, valid, frame_hw(message.image, message.pixel_format))


def main(config: PreprocessConfig, wiring: Wiring) -> None:
    run_stage(lambda: PreprocessStage(config), wiring)
