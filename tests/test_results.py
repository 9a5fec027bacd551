"""pipeline.results: full-frame masks, the JSON record and seq tracking, shared by the client, the
output writers and the CLI, without torch."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from maskstream.pipeline import client, results
from maskstream.pipeline.results import frame_record, mask, masks, rles, to_json

from tests.make_detections import FRAME_HW, make_detections


def test_importing_results_and_the_client_leaves_torch_out():
    """A subscriber must not pay for torch: these modules, and what they import, never load it."""
    code = (
        "import sys\n"
        "import maskstream.pipeline.results, maskstream.pipeline.client, maskstream.model.rle\n"
        "from maskstream.pipeline.client import Subscriber, masks\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_client_re_exports_the_results_api():
    for name in ("SeqTracker", "StreamStats", "crop_rles", "mask", "masks", "rles", "to_json"):
        assert getattr(client, name) is getattr(results, name), name


def test_to_json_is_the_header_then_the_frame_record():
    det, _ = make_detections("cam0", 3)
    line = to_json(det, gap=1)
    record = frame_record(det)
    assert list(line) == ["kind", "stream_id", "seq", "pts_s", "stamps", "drops", "gap", *record]
    assert {k: line[k] for k in record} == record
    assert (record["height"], record["width"]) == FRAME_HW
    assert json.loads(json.dumps(record)) == record  # JSON-able as it is
    first = record["detections"][0]
    assert first["box"] == [round(float(v), 2) for v in det.boxes[0]] and first["score"] == 0.9
    assert first["mask"]["crop_box"] == [int(v) for v in det.crop_boxes[0]]
    assert first["mask"]["rle"]["counts"] == det.rle_counts[0].decode("ascii")


def test_a_frame_without_instances():
    det, _ = make_detections("cam0", 0)
    empty = dataclasses.replace(
        det, boxes=det.boxes[:0], scores=det.scores[:0], labels=det.labels[:0], class_names=(),
        crop_boxes=det.crop_boxes[:0], rle_counts=(),
    )
    assert masks(empty).shape == (0, *FRAME_HW) and masks(empty).dtype == np.uint8
    assert rles(empty) == [] and frame_record(empty)["detections"] == []


def test_mask_errors_name_the_stream_frame_and_instance():
    det, full = make_detections("cam0", 5)
    outside = dataclasses.replace(det, crop_boxes=np.array([det.crop_boxes[0], [150, 0, 170, 10]], np.int32))
    with pytest.raises(ValueError, match=r"stream 'cam0' seq 5 instance 1: crop_box: \(150, 0, 170, 10\) does not fit"):
        mask(outside, 1)
    too_long = mask_utils.encode(np.ones((60, 60), np.uint8, order="F"))["counts"]  # runs past a 39x39 crop
    corrupt = dataclasses.replace(det, rle_counts=(det.rle_counts[0], too_long))
    np.testing.assert_array_equal(mask(corrupt, 0), full[0])
    with pytest.raises(ValueError, match=r"stream 'cam0' seq 5 instance 1: rle: counts do not decode"):
        mask(corrupt, 1)
