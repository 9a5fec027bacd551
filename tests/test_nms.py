"""batched_nms_padded / batched_nms against a slow transcription of torchvision's vanilla batched NMS."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from maskstream.model.ops import batched_nms, batched_nms_padded, batched_nms_reference
from maskstream.model.ops.iou_threshold import largest_not_above

from tests.op_cases import clustered

nms_module = importlib.import_module("maskstream.model.ops.nms")


def check_padded(boxes, scores, labels, iou, score_threshold, max_output):
    keep, num = batched_nms_padded(boxes, scores, labels, iou, score_threshold, max_output)
    assert keep.shape == (boxes.shape[0], max_output) and keep.dtype == torch.int64
    assert num.shape == (boxes.shape[0],) and num.dtype == torch.int64
    for i in range(boxes.shape[0]):
        expected = batched_nms_reference(boxes[i], scores[i], labels[i], iou, score_threshold)[:max_output]
        assert keep[i, : num[i]].tolist() == expected
        assert (keep[i, num[i]:] == -1).all()


@pytest.mark.parametrize("seed", range(12))
def test_padded_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    boxes, scores, labels = zip(*(clustered(gen, 150, 1 + seed % 4) for _ in range(2)))
    boxes, scores, labels = torch.stack(boxes), torch.stack(scores), torch.stack(labels)  # B = 2
    iou = float(torch.rand((), generator=gen)) * 0.8 + 0.1
    for max_output in (0, 5, 40, 400):  # smaller and larger than the kept count
        check_padded(boxes, scores, labels, iou, 0.2, max_output)


@pytest.mark.parametrize("seed", range(4))
def test_chunk_boundaries(seed, monkeypatch):
    # Tiny chunks so the chunk-versus-kept path and the early stop run on small inputs.
    monkeypatch.setattr(nms_module, "CHUNK", 7)
    gen = torch.Generator().manual_seed(50 + seed)
    boxes, scores, labels = clustered(gen, 120, 3)
    check_padded(boxes[None], scores[None], labels[None], 0.4, 0.0, 30)
    check_padded(boxes[None], scores[None], labels[None], 0.4, 0.0, 200)
    assert batched_nms(boxes, scores, labels, 0.4).tolist() == batched_nms_reference(boxes, scores, labels, 0.4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_box_dtypes(dtype):
    gen = torch.Generator().manual_seed(60)
    boxes, scores, labels = clustered(gen, 100, 2, dtype)
    check_padded(boxes[None], scores[None], labels[None], 0.5, 0.1, 100)


def test_dynamic_batched_nms_matches_reference():
    for seed in range(6):
        gen = torch.Generator().manual_seed(70 + seed)
        boxes, scores, labels = clustered(gen, 200, 1 + seed)
        keep = batched_nms(boxes, scores, labels, 0.5)
        assert keep.dtype == torch.int64
        assert keep.tolist() == batched_nms_reference(boxes, scores, labels, 0.5)


def test_nan_scores_are_never_candidates():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]])
    scores = torch.tensor([[float("nan"), 0.5, float("nan")]])
    keep, num = batched_nms_padded(boxes, scores, torch.zeros(1, 3, dtype=torch.int64), 0.5, float("-inf"), 3)
    assert keep.tolist() == [[1, -1, -1]] and num.tolist() == [1]


def test_identical_empty_boxes_do_not_suppress_each_other():
    # IoU = 0 / 0 = NaN, which is not > threshold (as in torchvision's kernel).
    boxes = torch.tensor([[[5.0, 5, 5, 5], [5, 5, 5, 5], [5, 5, 5, 5]]])
    keep, num = batched_nms_padded(boxes, torch.tensor([[0.9, 0.8, 0.7]]), torch.zeros(1, 3, dtype=torch.int64),
                                   0.0, 0.0, 3)
    assert keep.tolist() == [[0, 1, 2]] and num.tolist() == [3]


@pytest.mark.parametrize("chunk", [512, 1])  # within one chunk, and against boxes kept earlier
def test_iou_equal_to_threshold_is_kept_and_classes_are_separate(chunk, monkeypatch):
    monkeypatch.setattr(nms_module, "CHUNK", chunk)
    # IoU of these two boxes is exactly 0.5.
    boxes = torch.tensor([[[0.0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 1, 1]]])
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    same = torch.zeros(1, 3, dtype=torch.int64)
    assert batched_nms_padded(boxes, scores, same, 0.5, 0.0, 3)[0].tolist() == [[0, 1, -1]]
    assert batched_nms_padded(boxes, scores, same, 0.49, 0.0, 3)[0].tolist() == [[0, -1, -1]]
    apart = torch.tensor([[0, 1, 2]])
    assert batched_nms_padded(boxes, scores, apart, 0.0, 0.0, 3)[0].tolist() == [[0, 1, 2]]


def test_ties_keep_lower_index_first():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [50, 50, 60, 60]]])
    scores = torch.full((1, 4), 0.5)
    keep, _ = batched_nms_padded(boxes, scores, torch.tensor([[0, 0, 1, 1]]), 0.5, 0.0, 4)
    assert keep.tolist() == [[0, 2, -1, -1]]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.1 + 0.2, 1 / 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_threshold_in_dtype_keeps_the_double_comparison(threshold, dtype):
    t = largest_not_above(threshold, dtype)
    above = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    assert t.dtype == dtype and t.item() <= threshold < above.item()


def test_empty_input():
    keep, num = batched_nms_padded(torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.int64),
                                   0.5, 0.0, 4)
    assert keep.tolist() == [[-1] * 4] * 2 and num.tolist() == [0, 0]
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)


def test_opcheck():
    gen = torch.Generator().manual_seed(80)
    boxes, scores, labels = clustered(gen, 30, 3)
    torch.library.opcheck(
        torch.ops.maskstream.batched_nms_padded.default, (boxes[None], scores[None], labels[None], 0.5, 0.1, 10)
    )


def test_torch_export_and_same_output():
    class Nms(torch.nn.Module):
        def forward(self, boxes, scores, labels):
            return torch.ops.maskstream.batched_nms_padded(boxes, scores, labels, 0.5, 0.05, 20)

    gen = torch.Generator().manual_seed(81)
    boxes, scores, labels = (t[None].expand(2, *t.shape).contiguous() for t in clustered(gen, 60, 3))
    program = torch.export.export(Nms(), (boxes, scores, labels))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.maskstream.batched_nms_padded.default in targets
    for got, expected in zip(program.module()(boxes, scores, labels), Nms()(boxes, scores, labels)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((torch.zeros(1, 5, 3), torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.int64)), ValueError,
         r"boxes must be \[B, N, 4\]"),
        ((torch.zeros(1, 5, 4), torch.zeros(1, 4), torch.zeros(1, 5, dtype=torch.int64)), ValueError,
         r"scores must be \[B, N\] matching boxes"),
        ((torch.zeros(1, 5, 4), torch.zeros(1, 5), torch.zeros(1, 5)), TypeError, "classes must be an integer"),
        ((torch.zeros(1, 5, 4, dtype=torch.int64), torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.int64)),
         TypeError, "boxes must be a floating point"),
    ],
)
def test_bad_inputs_raise_clear_errors(args, error, message):
    with pytest.raises(error, match=message):
        batched_nms_padded(*args, 0.5, 0.0, 3)


def test_negative_max_output_is_rejected():
    with pytest.raises(ValueError, match="max_output must be >= 0, got -1"):
        batched_nms_padded(torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int64), 0.5, 0.0, -1)
