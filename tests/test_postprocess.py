import json

import numpy as np
import pytest
import torch
from maskstream.model.postprocess import (
    paste_mask_cropped,
    paste_masks_in_image,
    rescale_boxes,
    uncrop,
)
from maskstream.model.rle import decode_box_cropped_rle, decode_rle, encode_box_cropped_rle, encode_rle

from tests.paste_cases import random_cases, threshold_cases
from tests.shared_data import REFERENCE

# ------------------------------------------------------------------ slow reference


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] weights of a 1-D bilinear resize with align_corners=False.

    Source coordinate of output pixel i is (i + 0.5) * in / out - 0.5, clamped at 0
    (PyTorch clamps negatives for linear modes); the upper neighbour is clamped to the
    last input pixel.
    """
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        weights[i, lo] += 1.0 - frac
        weights[i, hi] += frac
    return weights


def reference_paste(mask: np.ndarray, box: np.ndarray, im_h: int, im_w: int) -> np.ndarray:
    """One [M,M] mask into an [H,W] frame, written from the algorithm's description."""
    m = mask.shape[0]
    padded = np.zeros((m + 2, m + 2))
    padded[1:-1, 1:-1] = mask
    # grow the box by (M+2)/M about its centre, in float32 like the model's boxes
    f32 = np.float32
    scale = f32((m + 2) / m)
    box = box.astype(f32)
    half_w, half_h = (box[2] - box[0]) * f32(0.5) * scale, (box[3] - box[1]) * f32(0.5) * scale
    cx, cy = (box[2] + box[0]) * f32(0.5), (box[3] + box[1]) * f32(0.5)
    x0, y0, x1, y1 = (int(v) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h))
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    resized = bilinear_matrix(h, m + 2) @ padded @ bilinear_matrix(w, m + 2).T
    frame = np.zeros((im_h, im_w))
    for y in range(h):
        for x in range(w):
            fy, fx = y0 + y, x0 + x
            # the box's integer extent is [x0, x1]; pixels past x1 exist only when w was
            # clamped to 1 for a degenerate box, and torchvision pastes none of them
            if 0 <= fy < im_h and 0 <= fx < im_w and fy <= y1 and fx <= x1:
                frame[fy, fx] = resized[y, x]
    return frame


# ------------------------------------------------------------------ pasting


@pytest.mark.parametrize("seed,im_h,im_w", [(0, 37, 53), (1, 64, 48), (2, 20, 90)])
def test_paste_matches_slow_reference(seed, im_h, im_w):
    masks, boxes = random_cases(seed, 25, im_h, im_w)
    pasted = paste_masks_in_image(masks, boxes, (im_h, im_w))
    assert isinstance(pasted, np.ndarray) and pasted.shape == (25, 1, im_h, im_w)
    assert pasted.dtype == np.float32
    for i in range(len(masks)):
        ref = reference_paste(masks[i, 0].astype(np.float64), boxes[i], im_h, im_w)
        np.testing.assert_allclose(pasted[i, 0], ref, atol=1e-5, rtol=0, err_msg=f"mask {i}")


def test_paste_torch_in_torch_out():
    masks, boxes = random_cases(3, 6, 30, 40)
    out = paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(boxes), (30, 40))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), paste_masks_in_image(masks, boxes, (30, 40)))


def test_paste_no_instances():
    out = paste_masks_in_image(torch.zeros((0, 1, 28, 28)), torch.zeros((0, 4)), (10, 12))
    assert out.shape == (0, 1, 10, 12)


def test_box_wholly_outside_gives_zeros():
    masks = np.ones((3, 1, 28, 28), np.float32)
    boxes = np.array([[-30, 2, -10, 8], [50, 2, 60, 8], [2, 40, 8, 60]], np.float32)
    assert not paste_masks_in_image(masks, boxes, (20, 40)).any()
    for m, b in zip(masks, boxes):
        crop, _ = paste_mask_cropped(m[0], b, (20, 40))
        assert crop.size == 0


@pytest.mark.parametrize("seed,im_h,im_w", [(4, 37, 53), (5, 16, 16)])
def test_cropped_paste_equals_full_paste(seed, im_h, im_w):
    masks, boxes = random_cases(seed, 30, im_h, im_w)
    full = paste_masks_in_image(masks, boxes, (im_h, im_w))
    for i in range(len(masks)):
        crop, (x0, y0) = paste_mask_cropped(masks[i, 0], boxes[i], (im_h, im_w))
        assert 0 <= x0 <= im_w and 0 <= y0 <= im_h
        placed = np.zeros((im_h, im_w), np.float32)
        placed[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        np.testing.assert_array_equal(placed, full[i, 0])
        if crop.size:
            np.testing.assert_array_equal(uncrop(crop, (x0, y0), (im_h, im_w)), full[i, 0])

        rle, crop_box = encode_box_cropped_rle(masks[i, 0], boxes[i], (im_h, im_w))
        assert crop_box == (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
        assert rle["size"] == [crop.shape[0], crop.shape[1]]
        frame = decode_box_cropped_rle(rle, crop_box, (im_h, im_w))
        np.testing.assert_array_equal(frame, (full[i, 0] > 0.5).astype(np.uint8))


def test_numpy_encoder_decides_every_pixel_as_the_torch_paste_does():
    """model.rle.encode_box_cropped_rle pastes in numpy (the postprocess stage has no torch): against
    paste_mask_cropped > threshold on frames from tiny to 1344 wide, continuous probabilities and
    plateaus of exact ties, a pixel may only differ where torch's float32 probability is within one
    float32 step of the threshold (where the last rounding of a blend decides)."""
    step = float(np.finfo(np.float32).eps)
    differing = total = 0
    for seed, masks, boxes, im_h, im_w in threshold_cases(12):
        for i in range(len(masks)):
            for threshold in (0.5, 0.3):
                probs, _ = paste_mask_cropped(masks[i, 0], boxes[i], (im_h, im_w))
                rle, crop_box = encode_box_cropped_rle(masks[i, 0], boxes[i], (im_h, im_w), threshold)
                x0, y0, x1, y1 = crop_box
                assert (x1 - x0, y1 - y0) == (probs.shape[1], probs.shape[0])
                if not probs.size:
                    continue
                differ = decode_rle(rle).astype(bool) != (probs > threshold)
                assert np.all(np.abs(probs[differ] - np.float32(threshold)) <= step), (seed, i)
                differing, total = differing + int(differ.sum()), total + differ.size
    assert total > 10**7 and differing < total * 1e-6


# ------------------------------------------------------------------ torchvision goldens


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference goldens not present")
@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_matches_torchvision_goldens(name):
    """torchvision's own boxes and RLE masks for a real image, from its RoI-head outputs."""
    golden = torch.load(REFERENCE / f"golden_v1_{name}.pt", weights_only=False)
    rles = json.loads(golden["mask_rle"])
    im_hw = tuple(rles[0]["size"])
    resized_hw = tuple(golden["image_size_resized"].tolist())

    boxes = rescale_boxes(golden["roi_boxes"], resized_hw, im_hw)
    assert torch.equal(boxes, golden["boxes"])  # bit-exact

    probs = golden["roi_mask_probs"]  # [K, 28, 28]
    pasted = paste_masks_in_image(probs[:, None], boxes, im_hw)  # [K, 1, H, W]
    for i, expected in enumerate(rles):
        assert encode_rle(pasted[i, 0] > 0.5) == expected, f"instance {i}"
        rle, crop_box = encode_box_cropped_rle(probs[i], boxes[i], im_hw)
        np.testing.assert_array_equal(
            decode_box_cropped_rle(rle, crop_box, im_hw), decode_rle(expected)
        )


# ------------------------------------------------------------------ boxes


def test_rescale_boxes_values():
    boxes = np.array([[10.0, 20.0, 30.0, 40.0]], np.float32)
    out = rescale_boxes(boxes, from_hw=(100, 200), to_hw=(50, 400))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [[20.0, 10.0, 60.0, 20.0]])


def test_rescale_boxes_uses_float32_ratios():
    boxes = torch.tensor([[123.456, 7.89, 799.9, 333.3]])
    out = rescale_boxes(boxes, (800, 1200), (400, 600))
    ratio = np.float32(400) / np.float32(800)
    expected = boxes.numpy() * ratio  # both ratios equal here
    np.testing.assert_array_equal(out.numpy(), expected)
    out = rescale_boxes(boxes, (800, 800), (512, 512))
    np.testing.assert_array_equal(out.numpy(), boxes.numpy() * (np.float32(512) / np.float32(800)))
    assert rescale_boxes(torch.zeros((0, 4)), (10, 10), (5, 5)).shape == (0, 4)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: paste_masks_in_image(
                np.zeros((2, 28, 28), np.float32), np.zeros((2, 4), np.float32), (9, 9)
            ),
            r"masks: expected floating \[N, 1, M, M\].*\[2, 28, 28\]",
        ),
        (
            lambda: paste_masks_in_image(
                np.zeros((2, 1, 28, 28), np.uint8), np.zeros((2, 4), np.float32), (9, 9)
            ),
            r"masks: expected floating.*uint8",
        ),
        (
            lambda: paste_masks_in_image(
                np.zeros((2, 1, 28, 28), np.float32), np.zeros((3, 4), np.float32), (9, 9)
            ),
            r"boxes: expected one box per mask \(2\), got 3",
        ),
        (
            lambda: paste_masks_in_image(
                np.zeros((2, 1, 28, 28), np.float32), np.zeros((2, 5), np.float32), (9, 9)
            ),
            r"boxes: expected floating \[N, 4\].*\[2, 5\]",
        ),
        (
            lambda: paste_masks_in_image(
                np.zeros((1, 1, 28, 28), np.float32), np.zeros((1, 4), np.float32), (0, 9)
            ),
            r"img_hw: expected \(height, width\) positive ints, got \(0, 9\)",
        ),
        (
            lambda: paste_masks_in_image(
                np.zeros((1, 1, 28, 28), np.float32),
                np.zeros((1, 4), np.float32),
                (9, 9),
                padding=-1,
            ),
            r"padding: expected a non-negative int",
        ),
        (
            lambda: paste_mask_cropped(
                np.zeros((28, 27), np.float32), np.zeros(4, np.float32), (9, 9)
            ),
            r"mask: expected floating \[M, M\].*\[28, 27\]",
        ),
        (
            lambda: paste_mask_cropped(
                np.zeros((28, 28), np.float32), np.zeros(3, np.float32), (9, 9)
            ),
            r"box: expected floating \[4\] xyxy.*\[3\]",
        ),
        (
            lambda: rescale_boxes(np.zeros((2, 4), np.int64), (1, 1), (2, 2)),
            r"boxes: expected floating \[N, 4\] xyxy boxes, got torch.int64",
        ),
        (
            lambda: rescale_boxes(np.zeros((2, 4), np.float32), (1, 1, 1), (2, 2)),
            r"from_hw: expected \(height, width\)",
        ),
        (
            lambda: uncrop(np.ones((3, 3)), (8, 0), (9, 9)),
            r"origin: crop of 3x3 at \(x0=8, y0=0\) does not fit in a 9x9 frame",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
