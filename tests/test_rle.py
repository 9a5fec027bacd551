"""model.rle: COCO RLE and the box-cropped form masks travel in (numpy + pycocotools, no torch)."""
import json

import numpy as np
import pytest
import torch
from maskstream.model.rle import (
    decode_box_cropped_rle,
    decode_rle,
    encode_box_cropped_rle,
    encode_crop_rle,
    encode_rle,
    mask_iou_rle,
    paste_box_cropped_rle,
)


def test_rle_round_trip():
    g = np.random.default_rng(0)
    cases = [
        g.random((17, 23)) > 0.5,
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        (g.random((9, 4)) > 0.3).astype(np.uint8) * 255,  # nonzero counts as foreground
        torch.from_numpy(g.random((6, 6)) > 0.5),
    ]
    for mask in cases:
        rle = encode_rle(mask)
        assert isinstance(rle["counts"], str)
        json.dumps(rle)
        decoded = decode_rle(json.loads(json.dumps(rle)))
        assert decoded.dtype == np.uint8 and decoded.flags.c_contiguous
        np.testing.assert_array_equal(decoded, np.asarray(mask) != 0)


def test_decode_uncompressed_and_bytes():
    mask = np.zeros((4, 3), np.uint8)
    mask[1:3, 1] = 1
    # column-major runs: 5 zeros, 2 ones, 5 zeros
    np.testing.assert_array_equal(decode_rle({"size": [4, 3], "counts": [5, 2, 5]}), mask)
    rle = encode_rle(mask)
    np.testing.assert_array_equal(
        decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask
    )


def test_mask_iou_rle():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True  # 16
    b[2:6, 2:6] = True  # 16, overlap 4
    assert mask_iou_rle(encode_rle(a), encode_rle(b)) == pytest.approx(4 / 28)
    assert mask_iou_rle(encode_rle(a), encode_rle(a)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="b: expected an RLE of size"):
        mask_iou_rle(encode_rle(a), encode_rle(np.zeros((3, 3), bool)))


# ------------------------------------------------------------------ box-cropped


@pytest.mark.parametrize(
    "crop_hw,origin,frame_hw",
    [
        ((5, 7), (3, 2), (12, 16)),
        ((12, 16), (0, 0), (12, 16)),  # the whole frame
        ((4, 3), (13, 8), (12, 16)),  # against the bottom-right corner
        ((0, 6), (2, 12), (12, 16)),  # empty: the box lay outside the frame
    ],
)
def test_crop_round_trip(crop_hw, origin, frame_hw):
    g = np.random.default_rng(sum(crop_hw))
    crop = g.random(crop_hw) > 0.4
    rle, crop_box = encode_crop_rle(crop, origin)
    x0, y0 = origin
    assert crop_box == (x0, y0, x0 + crop_hw[1], y0 + crop_hw[0]) and rle["size"] == list(crop_hw)
    expected = np.zeros(frame_hw, np.uint8)
    expected[y0 : y0 + crop_hw[0], x0 : x0 + crop_hw[1]] = crop
    np.testing.assert_array_equal(decode_box_cropped_rle(json.loads(json.dumps(rle)), crop_box, frame_hw), expected)


def test_encoder_takes_torch_tensors_and_lists_as_numpy():
    g = np.random.default_rng(3)
    probs, box = g.random((28, 28)).astype(np.float32), np.array([3.2, 4.7, 30.1, 22.9], np.float32)
    expected = encode_box_cropped_rle(probs, box, (24, 32))
    assert encode_box_cropped_rle(torch.from_numpy(probs).requires_grad_(), torch.from_numpy(box), (24, 32)) == expected
    assert encode_box_cropped_rle(probs, [float(v) for v in box], (24, 32))[1] == expected[1]
    assert expected[1] == (2, 4, 32, 24)  # the box grown by 30/28 about its centre, cut to the frame


def test_paste_writes_only_the_crop_box():
    frame = np.full((6, 8), 7, np.uint8)
    rle, crop_box = encode_crop_rle(np.ones((2, 3), bool), (4, 1))
    paste_box_cropped_rle(rle, crop_box, frame)
    assert (frame[1:3, 4:7] == 1).all()
    frame[1:3, 4:7] = 7
    assert (frame == 7).all()


def test_corrupt_counts_are_a_value_error():
    with pytest.raises(ValueError, match=r"rle: counts do not decode \(ValueError: "):
        decode_rle({"size": [4, 3], "counts": "zzzzzz"})
    with pytest.raises(ValueError, match=r"rle: counts do not decode"):
        decode_box_cropped_rle({"size": [2, 2], "counts": b"\xff\xfe"}, (0, 0, 2, 2), (4, 4))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: encode_rle(np.zeros((2, 3, 1), bool)),
            r"binary_mask: expected a \[H, W\] bool or uint8 mask, got bool \[2, 3, 1\]",
        ),
        (
            lambda: encode_rle(np.zeros((2, 3), np.float32)),
            r"binary_mask: expected a \[H, W\] bool or uint8 mask, got float32",
        ),
        (
            lambda: decode_rle({"counts": "abc"}),
            r"rle: expected a COCO RLE dict with 'size' and 'counts'",
        ),
        (lambda: decode_rle({"size": [2], "counts": "abc"}), r"rle: expected 'size' \[H, W\]"),
        (
            lambda: decode_box_cropped_rle(encode_rle(np.ones((2, 2), bool)), (0, 0, 3, 2), (9, 9)),
            r"crop_box: \(0, 0, 3, 2\) implies a 2x3 crop, but the RLE is 2x2",
        ),
        (
            lambda: decode_box_cropped_rle(encode_rle(np.ones((2, 2), bool)), (8, 0, 10, 2), (9, 9)),
            r"crop_box: \(8, 0, 10, 2\) does not fit in a 9x9 frame",
        ),
        (
            lambda: decode_box_cropped_rle(encode_rle(np.ones((2, 2), bool)), (0, 0, 2, 2), (0, 9)),
            r"img_hw: expected \(height, width\) positive ints, got \(0, 9\)",
        ),
        (lambda: encode_rle([[1, 0]]), r"binary_mask: expected a numpy array or torch tensor, got list"),
        (
            lambda: encode_box_cropped_rle(np.zeros((28, 27), np.float32), np.zeros(4, np.float32), (9, 9)),
            r"mask_probs: expected floating \[M, M\] mask probabilities, got float32 \[28, 27\]",
        ),
        (
            lambda: encode_box_cropped_rle(np.zeros((28, 28), np.uint8), np.zeros(4, np.float32), (9, 9)),
            r"mask_probs: expected floating .*uint8",
        ),
        (
            lambda: encode_box_cropped_rle(np.zeros((28, 28), np.float32), np.zeros(3, np.float32), (9, 9)),
            r"box: expected finite floating \[4\] xyxy",
        ),
        (
            lambda: encode_box_cropped_rle(
                np.zeros((28, 28), np.float32), np.array([0, 0, np.nan, 4], np.float32), (9, 9)
            ),
            r"box: expected finite floating \[4\] xyxy, got float32 \[0.0, 0.0, nan, 4.0\]",
        ),
        (
            lambda: encode_box_cropped_rle(np.zeros((28, 28), np.float32), np.zeros(4, np.float32), (9, -1)),
            r"img_hw: expected \(height, width\) positive ints",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
