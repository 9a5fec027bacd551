"""Pixels between decode and preprocess, with as few passes over a full-size frame as possible.

A decoder gives yuv420p planes (1.5 bytes per pixel). Converting a whole 1080p frame to RGB
(3 bytes per pixel) only for preprocess to shrink it to the model's input costs more than
everything else on the way: the decode stage instead ships the planes as they are
(`frame_pixels`, written straight into a shared-memory slot), and preprocess shrinks the
planes first and converts only the small result (`yuv420p_to_rgb_resized`).
benchmarks/bench_transport.py measures both ways.

Colour: BT.601, what FFmpeg's swscale assumes by default, in limited range (yuv420p: most
video) or full range (yuvj420p: MJPEG cameras, many phones; FFmpeg's RGB conversion of it
costs 4x the decode itself). Frames of other layouts (4:4:4, odd sizes, ...) are converted
to RGB by swscale instead.
"""
from __future__ import annotations

from collections.abc import Callable

import av
import cv2
import numpy as np

__all__ = ["PLANAR", "RGB24", "YUV420P", "YUVJ420P", "PixelRoute", "frame_pixels", "yuv420p_frame_hw",
           "yuv420p_to_rgb_resized"]

RGB24 = "rgb24"  # uint8 [H, W, 3]
YUV420P = "yuv420p"  # uint8 [H * 3 / 2, W]: Y rows, then the bytes of U [H/2, W/2], then of V (I420,
# PyAV's to_ndarray layout); limited range. A chroma plane is H/4 rows of W only when H % 4 == 0: the
# planes are read from the flat bytes after the Y rows, so H % 4 == 2 (e.g. 202 rows) fits too
YUVJ420P = "yuvj420p"  # the same layout, full range (Y, Cb, Cr all 0..255)
PLANAR = (YUV420P, YUVJ420P)

_FULL_RANGE = 2  # AVCOL_RANGE_JPEG

# Limited-range BT.601 Y'CbCr -> R'G'B', as a 3x4 affine map on (Y, U, V) for cv2.transform.
# R = Y' + 1.402 Cr, B = Y' + 1.772 Cb, G from Kr = 0.299, Kb = 0.114; Y' in 16..235, Cb, Cr in 16..240.
_Y, _V_R, _U_B = 255 / 219, 255 / 224 * 1.402, 255 / 224 * 1.772
_U_G, _V_G = _U_B * 0.114 / 0.587, _V_R * 0.299 / 0.587
_BT601_LIMITED = np.array([
    [_Y, 0.0, _V_R, -16 * _Y - 128 * _V_R],
    [_Y, -_U_G, -_V_G, -16 * _Y + 128 * (_U_G + _V_G)],
    [_Y, _U_B, 0.0, -16 * _Y - 128 * _U_B],
], dtype=np.float32)  # rows R, G, B; columns Y, U (Cb), V (Cr), 1
# Full range (JPEG): the same equations without the 16..235 / 16..240 scaling.
_BT601_FULL = np.array([
    [1.0, 0.0, 1.402, -128 * 1.402],
    [1.0, -1.772 * 0.114 / 0.587, -1.402 * 0.299 / 0.587, 128 * (1.772 * 0.114 + 1.402 * 0.299) / 0.587],
    [1.0, 1.772, 0.0, -128 * 1.772],
], dtype=np.float32)
_MATRICES = {YUV420P: _BT601_LIMITED, YUVJ420P: _BT601_FULL}


def frame_pixels(frame: av.VideoFrame, allocate: Callable[[tuple[int, ...]], np.ndarray]) -> tuple[np.ndarray, str]:
    """(the frame's pixels in an array from allocate(shape), their format: YUV420P, YUVJ420P or RGB24)."""
    height, width = frame.height, frame.width
    if frame.format.name in PLANAR and height % 2 == 0 and width % 2 == 0:
        out = allocate((height * 3 // 2, width))
        for plane, target in zip(frame.planes, (out[:height], *_chroma_planes(out, height, width))):
            # a plane's rows may be padded (line_size >= width): copy the useful part only
            lines = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(-1, plane.line_size)
            target[:] = lines[: target.shape[0], : target.shape[1]]
        full = frame.format.name == YUVJ420P or frame.color_range == _FULL_RANGE
        return out, YUVJ420P if full else YUV420P
    out = allocate((height, width, 3))
    out[:] = frame.to_ndarray(format="rgb24")  # swscale cannot write into our array: one copy
    return out, RGB24


class PixelRoute:
    """A `VideoSource` convert that keeps `frame_pixels`' planes, in arrays from `allocate`,
    and remembers their format: the source calls it in the reading thread just before it
    yields that frame, so `format` describes the frame just yielded."""

    def __init__(self, allocate: Callable[[tuple[int, ...]], np.ndarray]):
        self.allocate = allocate
        self.format = RGB24

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        image, self.format = frame_pixels(frame, self.allocate)
        return image


def _chroma_planes(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Views U, V [H/2, W/2] of the I420 planes `image` [H * 3 / 2, W] (C-contiguous: a slot or
    a new array), from the flat bytes after the Y rows."""
    chroma = image[height:].reshape(-1)  # a view: rows of a C-contiguous array are contiguous
    size = (height // 2) * (width // 2)
    return chroma[:size].reshape(height // 2, width // 2), chroma[size:].reshape(height // 2, width // 2)


def yuv420p_frame_hw(image: np.ndarray) -> tuple[int, int]:
    """(H, W) of the frame whose I420 planes `image` [H * 3 / 2, W] holds."""
    if image.ndim != 2 or image.shape[0] % 3 or image.shape[1] % 2:
        raise ValueError(f"image: expected yuv420p planes uint8 [H * 3 / 2, W] with H, W even, got {list(image.shape)}")
    return image.shape[0] * 2 // 3, image.shape[1]


def yuv420p_to_rgb_resized(image: np.ndarray, size_hw: tuple[int, int], pixel_format: str = YUV420P) -> np.ndarray:
    """The frame of I420 planes `image` (pixel_format: YUV420P or YUVJ420P) as uint8 RGB
    [h, w, 3] of size_hw: each plane resized (bilinear) to size_hw first, then converted, so
    only the small picture is converted."""
    height, width = yuv420p_frame_hw(image)
    h, w = size_hw
    y = cv2.resize(image[:height], (w, h), interpolation=cv2.INTER_LINEAR)  # [h, w]
    chroma = [cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR)  # [h, w]
              for plane in _chroma_planes(np.ascontiguousarray(image), height, width)]
    return cv2.transform(cv2.merge([y, *chroma]), _MATRICES[pixel_format])  # [h, w, 3], saturated to 0..255
