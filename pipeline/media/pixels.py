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

__all__ = ["COLOUR_MATRICES", "NV12", "PLANAR", "RGB24", "YUV420P", "YUVJ420P", "PixelRoute", "fit_size",
           "frame_pixels", "i420_planes", "yuv420p_frame_hw", "yuv420p_to_rgb_resized"]

RGB24 = "rgb24"  # uint8 [H, W, 3]
YUV420P = "yuv420p"  # uint8 [H * 3 / 2, W]: the Y plane, then U [H/2, W/2], then V, back to back (I420); limited range
YUVJ420P = "yuvj420p"  # the same layout, full range (Y, Cb, Cr all 0..255)
NV12 = "nv12"  # Y, then U and V interleaved: what NVDEC frames download as; never leaves decode
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
COLOUR_MATRICES = {YUV420P: _BT601_LIMITED, YUVJ420P: _BT601_FULL}  # float32 [3, 4] each


def fit_size(frame_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) a frame of frame_hw is resized to inside the model's input_hw, its aspect kept."""
    (height, width), (in_h, in_w) = frame_hw, input_hw
    scale = min(in_h / height, in_w / width)
    return max(1, min(in_h, int(height * scale))), max(1, min(in_w, int(width * scale)))


def frame_pixels(frame: av.VideoFrame, allocate: Callable[[tuple[int, ...]], np.ndarray]) -> tuple[np.ndarray, str]:
    """(the frame's pixels in an array from allocate(shape), their format: YUV420P, YUVJ420P or RGB24).

    4:2:0 frames keep their planes: I420 as it is, NV12 (what a hardware decoder downloads: U and V
    interleaved in one plane) split into I420 planes by the copy into the slot, which costs no
    more than the copy itself."""
    height, width = frame.height, frame.width
    name = frame.format.name
    if name in (*PLANAR, NV12) and height % 2 == 0 and width % 2 == 0:
        out = allocate((height * 3 // 2, width))
        y, u, v = i420_planes(out)
        y[:] = _plane(frame.planes[0], height, width)
        if name == NV12:
            uv = _plane(frame.planes[1], height // 2, width).reshape(height // 2, width // 2, 2)
            u[:], v[:] = uv[..., 0], uv[..., 1]
        else:
            u[:] = _plane(frame.planes[1], height // 2, width // 2)
            v[:] = _plane(frame.planes[2], height // 2, width // 2)
        full = name == YUVJ420P or frame.color_range == _FULL_RANGE
        return out, YUVJ420P if full else YUV420P
    out = allocate((height, width, 3))
    out[:] = frame.to_ndarray(format="rgb24")  # swscale cannot write into our array: one copy
    return out, RGB24


def _plane(plane: av.video.plane.VideoPlane, rows: int, width: int) -> np.ndarray:
    """uint8 [rows, width] view of a plane: its rows may be padded (line_size >= width)."""
    return np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(-1, plane.line_size)[:rows, :width]


def i420_planes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views (Y [H, W], U [H/2, W/2], V [H/2, W/2]) of the I420 planes `image` [H * 3 / 2, W] holds:
    the planes lie one after the other, so a chroma plane starts mid-row when H is 2 mod 4."""
    height, width = yuv420p_frame_hw(image)
    flat = image.reshape(-1)  # a view: slots and frames are C-contiguous
    luma, chroma = height * width, height * width // 4
    return (flat[:luma].reshape(height, width), flat[luma : luma + chroma].reshape(height // 2, width // 2),
            flat[luma + chroma :].reshape(height // 2, width // 2))


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


def yuv420p_frame_hw(image: np.ndarray) -> tuple[int, int]:
    """(H, W) of the frame whose I420 planes `image` [H * 3 / 2, W] holds."""
    if image.ndim != 2 or image.shape[0] % 3 or image.shape[1] % 2:
        raise ValueError(f"image: expected yuv420p planes uint8 [H * 3 / 2, W] with H, W even, got {list(image.shape)}")
    return image.shape[0] * 2 // 3, image.shape[1]


def yuv420p_to_rgb_resized(image: np.ndarray, size_hw: tuple[int, int], pixel_format: str = YUV420P) -> np.ndarray:
    """The frame of I420 planes `image` (pixel_format: YUV420P or YUVJ420P) as uint8 RGB
    [h, w, 3] of size_hw: each plane resized (bilinear) to size_hw first, then converted, so
    only the small picture is converted."""
    h, w = size_hw
    planes = [cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR) for plane in i420_planes(image)]  # [h, w]
    return cv2.transform(cv2.merge(planes), COLOUR_MATRICES[pixel_format])  # [h, w, 3], saturated to 0..255
