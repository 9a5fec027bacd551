"""Masks pasted and thresholded in torch, only the crops copied back (model.mask_crops), on CPU
tensors: the crop boxes are the numpy paste's exactly, and a pixel differs from the numpy paste
only where torch's probability lies within one float32 step of the threshold (the bound the
numpy encoder itself is held to against torch's paste)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from maskstream.model import mask_crops
from maskstream.model.mask_crops import binary_crops, packed_crops
from maskstream.model.postprocess import paste_mask_cropped
from maskstream.model.rle import decode_rle, encode_box_cropped_rle

from tests.paste_cases import threshold_cases


def test_binary_crops_decide_every_pixel_as_the_numpy_paste_does():
    step = float(np.finfo(np.float32).eps)
    differing = total = 0
    for seed, masks, boxes, im_h, im_w in threshold_cases(8):
        for threshold in (0.5, 0.3):
            crops = binary_crops(torch.from_numpy(masks[:, 0]), torch.from_numpy(boxes), (im_h, im_w), threshold)
            assert len(crops) == len(masks)
            for i, (crop, (x0, y0)) in enumerate(crops):
                rle, crop_box = encode_box_cropped_rle(masks[i, 0], boxes[i], (im_h, im_w), threshold)
                assert crop.dtype == bool and crop_box == (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
                if not crop.size:
                    continue
                probs, origin = paste_mask_cropped(masks[i, 0], boxes[i], (im_h, im_w))
                assert origin == (x0, y0) and probs.shape == crop.shape
                differ = decode_rle(rle).astype(bool) != crop
                assert np.all(np.abs(probs[differ] - np.float32(threshold)) <= step), (seed, i)
                # and against torch's own paste: the same blends, so the same bound
                assert np.all(np.abs(probs[(probs > threshold) != crop] - np.float32(threshold)) <= step)
                differing, total = differing + int(differ.sum()), total + differ.size
    assert total > 10**6 and differing < total * 1e-5


def test_binary_crops_take_no_boxes_and_refuse_wrong_shapes():
    assert binary_crops(torch.zeros((0, 28, 28)), torch.zeros((0, 4)), (10, 10)) == []
    crops = binary_crops(torch.ones((1, 28, 28)), torch.tensor([[-50.0, -50.0, -20.0, -20.0]]), (10, 10))
    assert crops[0][0].shape == (0, 0) and crops[0][1] == (0, 0)  # wholly outside: an empty crop
    with pytest.raises(ValueError, match=r"mask_probs: expected floating \[N, M, M\]"):
        binary_crops(torch.zeros((2, 1, 28, 28)), torch.zeros((2, 4)), (10, 10))
    with pytest.raises(ValueError, match=r"boxes: expected floating \[2, 4\]"):
        binary_crops(torch.zeros((2, 28, 28)), torch.zeros((3, 4)), (10, 10))


@pytest.mark.parametrize("chunk_pixels", [None, 5000])
def test_packed_crops_of_several_frames_are_each_frames_binary_crops_packed_as_np_packbits(chunk_pixels, monkeypatch):
    """All frames in one pass, or (a small chunk) a pass per few frames and per frame larger than it."""
    if chunk_pixels:
        monkeypatch.setattr(mask_crops, "_CHUNK_PIXELS", chunk_pixels)
        assert mask_crops._chunks([3000, 3000, 9000, 0, 100]) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    frames = [case for case in threshold_cases(2)]
    masks = torch.from_numpy(np.concatenate([m[:, 0] for _, m, _, _, _ in frames]))
    boxes = torch.from_numpy(np.concatenate([b for _, _, b, _, _ in frames]))
    # a frame without instances among them, and one whose instances all lie outside it
    counts = [len(m) for _, m, _, _, _ in frames]
    sizes = [(h, w) for *_, h, w in frames]
    outside = torch.tensor([[-50.0, -50.0, -20.0, -20.0]] * 2)
    masks = torch.cat([torch.ones((2, 28, 28)), masks[: counts[0]], masks[counts[0]:]])
    boxes = torch.cat([outside, boxes])
    counts, sizes = [2, 0, *counts], [(10, 10), (30, 40), *sizes]
    packed = packed_crops(masks, boxes, sizes, counts, 0.4)
    assert len(packed) == len(counts)
    start = 0
    for (crop_boxes, bits), n, hw in zip(packed, counts, sizes):
        crops = binary_crops(masks[start : start + n], boxes[start : start + n], hw, 0.4)
        start += n
        assert crop_boxes.dtype == np.int32 and crop_boxes.shape == (n, 4) and bits.dtype == np.uint8
        assert crop_boxes.tolist() == [[x0, y0, x0 + c.shape[1], y0 + c.shape[0]] for c, (x0, y0) in crops]
        flat = np.concatenate([c.reshape(-1) for c, _ in crops]) if crops else np.zeros(0, bool)
        np.testing.assert_array_equal(bits, np.packbits(flat))
    assert packed[0][1].size == 0 and packed[1][1].size == 0 and packed[2][1].size > 0
    with pytest.raises(ValueError, match=r"counts: expected one count >= 0 per frame \(2\)"):
        packed_crops(masks[:3], boxes[:3], [(10, 10), (10, 10)], [1, 1])
