"""The inference process's preprocess in torch (pipeline.media.gpu_preprocess) against the CPU
preprocess stage, on CPU tensors: the same input within 1 unit of uint8 (OpenCV's fixed point is
reproduced, so in practice equal), for I420 planes as decode ships them (limited and full range,
heights 0 and 2 mod 4) and RGB frames (odd sizes, which decode converts), shrunk, enlarged and
halved; and decode's planes for those sizes, NV12 (a hardware decoder's) split into I420."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from maskstream.pipeline.media.gpu_preprocess import Letterbox
from maskstream.pipeline.media.pixels import NV12, RGB24, YUV420P, YUVJ420P, frame_pixels, i420_planes
from maskstream.pipeline.stages.preprocess import fit_to_input

PAD = (124, 116, 104)
# (frame H, W), (input H, W): 1080p into R50's input, 2-mod-4 heights (270, 542), odd sizes (RGB
# only: decode converts those), an exact halving (OpenCV's area path), an enlargement, one size.
SIZES = [((1080, 1920), (800, 1344)), ((270, 480), (128, 160)), ((542, 966), (320, 512)),
         ((241, 333), (96, 160)), ((480, 640), (240, 320)), ((90, 120), (200, 300)), ((64, 64), (64, 64))]


def _picture(height, width, seed):
    """Smooth gradients plus noise: mid-range values and sharp steps, both."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    smooth = np.stack([xs * 200 // max(width - 1, 1), ys * 200 // max(height - 1, 1),
                       (xs + ys) * 200 // max(width + height - 2, 1)], axis=-1)
    return np.clip(smooth + rng.integers(-40, 40, (height, width, 3)) + 20, 0, 255).astype(np.uint8)


def _decoded(rgb, pix_fmt):
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
    return frame_pixels(frame, lambda shape: np.empty(shape, np.uint8))


def _both(image, pixel_format, input_hw):
    expected, valid = fit_to_input(image, input_hw, PAD, pixel_format)
    out = torch.full((3, *input_hw), 7, dtype=torch.uint8)  # not the pad colour: every pixel must be written
    got_valid, frame_hw = Letterbox(input_hw, PAD)(torch.from_numpy(image), pixel_format, out)
    return expected, valid, out.numpy(), got_valid, frame_hw


@pytest.mark.parametrize("frame_hw,input_hw", SIZES)
@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuvj420p", "rgb24"])
def test_gpu_preprocess_equals_the_cpu_preprocess(frame_hw, input_hw, pix_fmt):
    height, width = frame_hw
    if pix_fmt != "rgb24" and (height % 2 or width % 2):
        pytest.skip("4:2:0 planes have even sizes (decode converts the rest to RGB)")
    rgb = _picture(height, width, seed=height + width)
    image, pixel_format = (rgb, RGB24) if pix_fmt == "rgb24" else _decoded(rgb, pix_fmt)
    assert pixel_format == {"rgb24": RGB24, "yuv420p": YUV420P, "yuvj420p": YUVJ420P}[pix_fmt]
    expected, valid, got, got_valid, got_frame_hw = _both(image, pixel_format, input_hw)
    assert got_valid == valid and got_frame_hw == frame_hw
    difference = np.abs(got.astype(int) - expected)
    assert difference.max() <= 1, f"{difference.max()} at {np.argwhere(difference > 1)[:5].tolist()}"
    assert (got[:, valid[0]:, :] == np.array(PAD)[:, None, None]).all()
    assert (got[:, :, valid[1]:] == np.array(PAD)[:, None, None]).all()


def test_gpu_preprocess_refuses_what_the_cpu_preprocess_refuses():
    pre = Letterbox((96, 160), PAD)
    out = torch.zeros((3, 96, 160), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expected yuv420p planes uint8 \[H \* 3 / 2, W\]"):
        pre(torch.zeros((181, 160), dtype=torch.uint8), YUV420P, out)
    with pytest.raises(ValueError, match=r"expected uint8 \[H, W, 3\] rgb24"):
        pre(torch.zeros((120, 160, 4), dtype=torch.uint8), RGB24, out)
    with pytest.raises(ValueError, match=r"out: expected \[3, 96, 160\]"):
        pre(torch.zeros((120, 160, 3), dtype=torch.uint8), RGB24, torch.zeros((3, 96, 161), dtype=torch.uint8))


@pytest.mark.parametrize("height,width", [(270, 480), (120, 160), (542, 966)])
def test_decode_keeps_4_2_0_planes_at_2_mod_4_heights_and_splits_nv12(height, width):
    rgb = _picture(height, width, seed=3)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    planes, pixel_format = frame_pixels(frame, lambda shape: np.empty(shape, np.uint8))
    assert pixel_format == YUV420P and planes.shape == (height * 3 // 2, width)
    for got, plane, rows in zip(i420_planes(planes), frame.planes, (height, height // 2, height // 2)):
        lines = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
        assert np.array_equal(got, lines[:rows, : got.shape[1]])
    nv12 = frame.reformat(format=NV12)
    from_nv12, nv12_format = frame_pixels(nv12, lambda shape: np.empty(shape, np.uint8))
    assert nv12_format == YUV420P and np.array_equal(from_nv12, planes)
