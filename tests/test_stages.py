"""Stage classes without sockets: preprocess geometry, postprocess output, publish's reordering."""
from __future__ import annotations

import numpy as np

from pipeline.messages import Detections, EndOfStream, Frame, Header, ModelInput, RawDetections
from pipeline.reorder import Reorderer
from pipeline.stages.postprocess import PostprocessConfig, PostprocessStage
from pipeline.stages.preprocess import PreprocessConfig, PreprocessStage, fit_to_input


def test_fit_keeps_aspect_and_pads_with_the_pad_colour():
    image = np.full((480, 640, 3), 200, dtype=np.uint8)
    out, valid = fit_to_input(image, (192, 320), (124, 116, 104))
    assert out.shape == (3, 192, 320) and valid == (192, 256)
    assert (out[:, :, :256] == 200).all() and (out[:, 0, 256:].T == (124, 116, 104)).all()
    message = PreprocessStage(PreprocessConfig((192, 320), (0, 0, 0))).process(Frame(Header("s", 0), image))
    assert isinstance(message, ModelInput) and message.frame_hw == (480, 640) and message.valid_hw == (192, 256)


def test_postprocess_rescales_boxes_and_crops_masks():
    raw = RawDetections(Header("s", 3), np.array([[10, 10, 50, 30]], np.float32), np.array([0.9], np.float32),
                        np.array([1]), np.ones((1, 28, 28), np.float32), valid_hw=(120, 160), frame_hw=(240, 320))
    det = PostprocessStage(PostprocessConfig(("bg", "thing"))).process(raw)
    assert isinstance(det, Detections) and det.class_names == ("thing",)
    np.testing.assert_allclose(det.boxes, [[20, 20, 100, 60]])
    x0, y0, x1, y1 = det.crop_boxes[0]
    assert x0 <= 20 and x1 >= 100 and y0 <= 20 and y1 >= 60


def _f(seq):
    return EndOfStream(Header("s", seq)) if seq == 4 else Frame(Header("s", seq), np.zeros((1, 1, 3), np.uint8))


def test_offline_order_restored_duplicates_dropped_lost_counted():
    order = Reorderer({"s": False}, gap_timeout_s=10, overtake_limit=100)
    assert order.push(_f(1), now=0) == [] and order.push(_f(2), now=0) == []
    assert [m.header.seq for m in order.push(_f(0), now=0)] == [0, 1, 2]
    assert order.push(_f(1), now=0) == []  # a restarted decoder's duplicate
    assert order.push(_f(4), now=1) == []  # frame 3 went down with a stage ...
    [eos] = order.poll(now=12)  # ... and is skipped after the gap timeout
    assert isinstance(eos, EndOfStream) and dict(eos.header.drops)["publish"] == 1
    assert order.streams["s"].ended and order.streams["s"].lost == 1


def test_live_never_waits_and_drops_late_frames():
    order = Reorderer({"s": True}, gap_timeout_s=10, overtake_limit=100)
    assert [m.header.seq for m in order.push(_f(2))] == [2]
    assert order.push(_f(1)) == [] and order.streams["s"].lost == 1
