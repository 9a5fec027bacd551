"""The preprocess stage's resize, colour conversion and letterbox as torch ops, on any device.

The inference process runs this on the CUDA runner's device instead of the CPU preprocess stage
(pipeline.run_config plans the run without that stage then: decode's frames go straight to the
inference process, in their native planes, and only the model's input is ever made from them).
Its results equal the CPU preprocess's (pipeline.stages.preprocess.fit_to_input): the same
fixed-point arithmetic as OpenCV's uint8 bilinear resize (11-bit coefficients, its vectorised
rounding of the vertical pass) and as cv2.transform's uint8 3x4 colour matrix (10-bit
coefficients), in int32 tensor ops. So the same code on CPU tensors is what CI checks.

    pre = Letterbox(contract.input_hw, contract.pad_rgb)
    valid_hw, frame_hw = pre(planes, "yuv420p", out)   # planes: uint8 tensor, out: uint8 [3, H, W]
"""
from __future__ import annotations

import numpy as np
import torch
from maskstream.pipeline.media.pixels import COLOUR_MATRICES, PLANAR, RGB24, fit_size

__all__ = ["Letterbox"]

_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)
_TRANSFORM_BITS = 10  # cv2.transform's fixed point for uint8 3x4 matrices


class _Taps:
    """One axis of cv2.resize(INTER_LINEAR) on uint8: for each output index, two source indices
    and their 11-bit weights, as OpenCV computes them (a float32 source coordinate; the x axis
    pins coordinates outside the image to its edge pixel, the y axis clamps the row indices)."""

    def __init__(self, in_size: int, out_size: int, edge_pinned: bool, device: torch.device):
        f = ((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5).astype(np.float32)
        s = np.floor(f).astype(np.int64)
        f = f - s.astype(np.float32)
        if edge_pinned:
            f[(s < 0) | (s >= in_size - 1)] = 0
            s = np.clip(s, 0, in_size - 1)
        # np.round, like OpenCV's saturate_cast<short>, rounds half to even
        w0 = np.round((np.float32(1) - f) * _COEF_SCALE).astype(np.int32)
        w1 = np.round(f * _COEF_SCALE).astype(np.int32)
        self.i0 = torch.from_numpy(np.clip(s, 0, in_size - 1)).to(device)
        self.i1 = torch.from_numpy(np.clip(s + 1, 0, in_size - 1)).to(device)
        self.w0 = torch.from_numpy(w0).to(device)
        self.w1 = torch.from_numpy(w1).to(device)


class Letterbox:
    """uint8 frame tensors (I420 planes [H * 3 / 2, W] or RGB [H, W, 3]) -> the model's input:
    resized with the aspect kept into the top-left corner of `out` [3, H_in, W_in], the rest the
    pad colour. The taps of each size met are kept (a stream's frames keep their size)."""

    def __init__(self, input_hw: tuple[int, int], pad_rgb: tuple[int, int, int]):
        self.input_hw = input_hw
        self.pad_rgb = pad_rgb
        self._taps: dict[tuple[int, int, bool, torch.device], _Taps] = {}
        # cv2.transform's integer matrices: round(m * 1024), the +512 of its rounding in the offset
        self._matrices = {fmt: [[int(v) for v in row] for row in
                                np.round(m.astype(np.float32) * (1 << _TRANSFORM_BITS)).astype(np.int64)]
                          for fmt, m in COLOUR_MATRICES.items()}

    def __call__(self, image: torch.Tensor, pixel_format: str, out: torch.Tensor
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Write the input made from `image` into `out` (same device); (valid (h, w), frame (H, W))."""
        if image.dtype != torch.uint8 or out.dtype != torch.uint8:
            raise ValueError(f"image, out: expected uint8 tensors, got {image.dtype} and {out.dtype}")
        if tuple(out.shape) != (3, *self.input_hw):
            raise ValueError(f"out: expected [3, {self.input_hw[0]}, {self.input_hw[1]}], got {list(out.shape)}")
        frame_hw = _frame_hw(image, pixel_format)
        valid = fit_size(frame_hw, self.input_hw)
        if pixel_format in PLANAR:
            planes = _i420_planes(image, *frame_hw)
            yuv = [self._resize(p[None], valid)[0] for p in planes]  # 3 x [h, w] int32
            rgb = self._convert(yuv, pixel_format)  # [3, h, w] int32 in 0..255
        else:
            rgb = self._resize(image.permute(2, 0, 1), valid)  # [3, h, w]
        h, w = valid
        out[:, :h, :w] = rgb
        for channel, value in zip(out, self.pad_rgb):  # fills: nothing to copy to the device
            channel[h:, :] = value
            channel[:h, w:] = value
        return valid, frame_hw

    def _resize(self, channels: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
        """uint8 [C, H, W] -> int32 [C, h, w] in 0..255: cv2.resize(INTER_LINEAR) to the value."""
        _, height, width = channels.shape
        cols = self._axis(width, size_hw[1], True, channels.device)
        rows = self._axis(height, size_hw[0], False, channels.device)
        src = channels.to(torch.int32)
        # horizontal pass, exact in int32: source * 11-bit weights
        horizontal = src[:, :, cols.i0] * cols.w0 + src[:, :, cols.i1] * cols.w1  # [C, H, w]
        # vertical pass as OpenCV's vectorised uint8 path rounds it: the 22-bit products taken
        # to 16 bits before the multiply, each product's high half kept, then + 2 >> 2
        top = ((horizontal[:, rows.i0] >> 4) * rows.w0[:, None]) >> 16  # [C, h, w]
        bottom = ((horizontal[:, rows.i1] >> 4) * rows.w1[:, None]) >> 16
        return ((top + bottom + 2) >> 2).clamp_(0, 255)

    def _convert(self, yuv: list[torch.Tensor], pixel_format: str) -> torch.Tensor:
        """Resized Y, U, V (int32 [h, w] each) -> int32 RGB [3, h, w], as cv2.transform rounds."""
        y, u, v = yuv
        half = 1 << (_TRANSFORM_BITS - 1)
        return torch.stack([((my * y + mu * u + mv * v + (offset + half)) >> _TRANSFORM_BITS).clamp_(0, 255)
                            for my, mu, mv, offset in self._matrices[pixel_format]])

    def _axis(self, in_size: int, out_size: int, edge_pinned: bool, device: torch.device) -> _Taps:
        key = (in_size, out_size, edge_pinned, device)
        taps = self._taps.get(key)
        if taps is None:
            taps = self._taps[key] = _Taps(in_size, out_size, edge_pinned, device)
        return taps


def _frame_hw(image: torch.Tensor, pixel_format: str) -> tuple[int, int]:
    if pixel_format in PLANAR:
        if image.ndim != 2 or image.shape[0] % 3 or image.shape[1] % 2:
            raise ValueError(f"image: expected yuv420p planes uint8 [H * 3 / 2, W] with H, W even, "
                             f"got {list(image.shape)}")
        return int(image.shape[0]) * 2 // 3, int(image.shape[1])
    if pixel_format != RGB24 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3] rgb24 or yuv420p/yuvj420p planes, got {pixel_format} "
                         f"{list(image.shape)}")
    return int(image.shape[0]), int(image.shape[1])


def _i420_planes(image: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Y [H, W], U, V [H/2, W/2] views of I420 planes (pipeline.media.pixels.i420_planes' layout)."""
    flat = image.reshape(-1)
    luma, chroma = height * width, height * width // 4
    return (flat[:luma].view(height, width), flat[luma : luma + chroma].view(height // 2, width // 2),
            flat[luma + chroma :].view(height // 2, width // 2))
