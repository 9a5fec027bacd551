"""Stage classes without sockets: decode's colour conversion, preprocess geometry, inference
batching, postprocess output, publish's reordering."""
from __future__ import annotations

import time

import av
import numpy as np
import pytest
from maskstream.model.contract import InferenceContract
from maskstream.model.postprocess import paste_mask_cropped, paste_masks_in_image
from maskstream.model.rle import decode_box_cropped_rle, decode_rle
from maskstream.pipeline.config import load_config
from maskstream.pipeline.media.pixels import RGB24, YUV420P, YUVJ420P, frame_pixels
from maskstream.pipeline.run_config import CONFIG_DIR, RunConfig
from maskstream.pipeline.runtime.messages import (
    Detections,
    EndOfStream,
    Frame,
    Header,
    Limits,
    ModelInput,
    RawDetections,
    decode,
    encode,
)
from maskstream.pipeline.runtime.reorder import Reorderer
from maskstream.pipeline.runtime.stage import Timed
from maskstream.pipeline.stages.postprocess import PostprocessConfig, PostprocessStage
from maskstream.pipeline.stages.preprocess import PreprocessConfig, PreprocessStage, fit_to_input

from tests.tiny_models import tiny_infer_stage, tiny_model_input

TORCHVISION_MEAN, TORCHVISION_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # pad colour (124, 116, 104)


def contract(height: int, width: int, mean=TORCHVISION_MEAN, names=("bg", "thing")) -> InferenceContract:
    return InferenceContract(1, height, width, 10, names, mean, TORCHVISION_STD)


def _decoded(pix_fmt, height=120, width=160):
    """A smooth test picture as a decoder would give it in pix_fmt, and its RGB as FFmpeg converts it."""
    ys, xs = np.mgrid[0:height, 0:width]
    # mid-range values, as in camera pictures: saturated colours clip, and clipping before or
    # after shrinking the chroma planes differs
    rgb = 48 + np.stack([xs * 160 // (width - 1), ys * 160 // (height - 1), (xs + ys) * 160 // (width + height - 2)],
                        axis=-1).astype(np.uint8)  # [H, W, 3]
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
    return frame, frame.to_ndarray(format="rgb24")


@pytest.mark.parametrize("height", [120, 202])  # 202 % 4 == 2: a chroma plane is no whole number of rows of W
def test_frame_pixels_keep_4_2_0_planes_and_convert_anything_else(height):
    for pix_fmt, expected in (("yuv420p", YUV420P), ("yuvj420p", YUVJ420P)):  # limited and full range
        frame, _ = _decoded(pix_fmt, height)
        image, pixel_format = frame_pixels(frame, lambda shape: np.empty(shape, np.uint8))
        assert pixel_format == expected and np.array_equal(image, frame.to_ndarray(format=pix_fmt))
    frame, rgb = _decoded("yuv444p")  # other subsampling: RGB by FFmpeg
    image, pixel_format = frame_pixels(frame, lambda shape: np.empty(shape, np.uint8))
    assert pixel_format == RGB24 and np.array_equal(image, rgb)


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuvj420p"])
@pytest.mark.parametrize(("height", "valid_hw"), [(240, (96, 128)), (202, (96, 152))])  # 202: H % 4 == 2
def test_4_2_0_frames_preprocess_like_rgb_frames(pix_fmt, height, valid_hw):
    frame, rgb = _decoded(pix_fmt, height, 320)
    planes, pixel_format = frame_pixels(frame, lambda shape: np.empty(shape, np.uint8))
    assert pixel_format != RGB24  # the planes' own route, not swscale's
    config = PreprocessConfig(contract(96, 160))
    from_rgb = PreprocessStage(config).process(Frame(Header("s", 0), rgb))
    from_yuv = PreprocessStage(config).process(Frame(Header("s", 0), planes, pixel_format))
    assert from_yuv.frame_hw == from_rgb.frame_hw == (height, 320)
    assert from_yuv.valid_hw == from_rgb.valid_hw == valid_hw
    # shrinking the planes before converting vs after: a couple of levels on a smooth picture
    difference = np.abs(from_yuv.image.astype(int) - from_rgb.image)
    assert difference.mean() < 1.5 and difference.max() <= 12
    with pytest.raises(ValueError, match=r"expected yuv420p planes uint8 \[H \* 3 / 2, W\]"):
        PreprocessStage(config).process(Frame(Header("s", 0), planes[:-1], YUV420P))


def test_fit_keeps_aspect_and_pads_with_the_pad_colour():
    image = np.full((480, 640, 3), 200, dtype=np.uint8)
    out, valid = fit_to_input(image, (192, 320), (124, 116, 104))
    assert out.shape == (3, 192, 320) and valid == (192, 256)
    assert (out[:, :, :256] == 200).all() and (out[:, 0, 256:].T == (124, 116, 104)).all()
    assert contract(192, 320).pad_rgb == (124, 116, 104)
    black = PreprocessConfig(contract(192, 320, mean=(0, 0, 0)))
    message = PreprocessStage(black).process(Frame(Header("s", 0), image))
    assert isinstance(message, ModelInput) and message.frame_hw == (480, 640) and message.valid_hw == (192, 256)
    assert (message.image[:, 0, 256:] == 0).all()  # the contract's pad colour: its mean, here black


def test_postprocess_rescales_boxes_and_crops_masks():
    probs = np.zeros((1, 28, 28), np.float32)
    probs[0, :, :14] = 1  # the left half of the box: a flipped, transposed or misplaced paste shows
    raw = RawDetections(Header("s", 3), np.array([[10, 10, 50, 30]], np.float32), np.array([0.9], np.float32),
                        np.array([1]), probs, valid_hw=(120, 160), frame_hw=(240, 320))
    det = PostprocessStage(PostprocessConfig(contract(128, 160))).process(raw)
    assert isinstance(det, Detections) and det.class_names == ("thing",)
    np.testing.assert_allclose(det.boxes, [[20, 20, 100, 60]])
    x0, y0, x1, y1 = det.crop_boxes[0]
    assert x0 <= 20 and x1 >= 100 and y0 <= 20 and y1 >= 60
    # The RLE decodes to the left half of the frame-pixel box [20, 20, 100, 60] (a pixel of
    # bilinear edge either way), and to exactly what the full-frame paste gives.
    rle = {"size": [int(y1 - y0), int(x1 - x0)], "counts": det.rle_counts[0]}
    mask = decode_box_cropped_rle(rle, det.crop_boxes[0], det.frame_hw)
    assert mask.shape == (240, 320)
    assert mask[20:60, 20:60].all()
    ys, xs = np.nonzero(mask)
    assert 19 <= ys.min() and ys.max() <= 61 and 19 <= xs.min() and xs.max() <= 61
    expected = paste_masks_in_image(probs[:, None], det.boxes, det.frame_hw)[0, 0] > 0.5
    np.testing.assert_array_equal(mask, expected)


def test_postprocess_rescales_boxes_bit_for_bit_as_torchvision_does():
    """The stage's numpy rescale (its process needs no torch) against model.postprocess's torch one,
    torchvision's resize_boxes operation for operation: the same float32 ratios and products."""
    from maskstream.model.postprocess import rescale_boxes as torch_rescale
    from maskstream.pipeline.stages.postprocess import rescale_boxes

    rng = np.random.default_rng(0)
    for from_hw, to_hw in (((120, 160), (240, 320)), ((800, 1344), (1080, 1920)), ((512, 864), (333, 601))):
        boxes = (rng.random((50, 4)) * np.array([*from_hw[::-1], *from_hw[::-1]])).astype(np.float32)
        got = rescale_boxes(boxes, from_hw, to_hw)
        assert got.dtype == np.float32 and np.array_equal(got, torch_rescale(boxes, from_hw, to_hw))


def _f(seq):
    return EndOfStream(Header("s", seq)) if seq == 4 else Frame(Header("s", seq), np.zeros((1, 1, 3), np.uint8))


def test_offline_order_restored_duplicates_dropped_and_gaps_waited_for_however_long():
    order = Reorderer({"s": False})
    assert order.push(_f(1)) == [] and order.push(_f(2)) == []
    assert [m.header.seq for m in order.push(_f(0))] == [0, 1, 2]
    assert order.push(_f(1)) == [] and order.push(_f(2)) == []  # a rewound decoder's copies
    assert order.push(_f(4)) == [] and order.push(_f(4)) == []  # frame 3 went down with a stage ...
    assert order.holding == 1 and not order.streams["s"].ended  # ... and is waited for: a rewind sends it again
    [three, eos] = order.push(_f(3))
    assert three.header.seq == 3 and isinstance(eos, EndOfStream) and "publish" not in dict(eos.header.drops)
    assert order.streams["s"].ended and order.streams["s"].lost == 0 and order.streams["s"].duplicates == 3
    assert order.streams["s"].released == 4 and order.streams["s"].next_seq == 4


def test_offline_frames_given_up_are_skipped_and_counted_as_lost():
    order = Reorderer({"s": False}, give_up=(("s", 1),))
    assert [m.header.seq for m in order.push(_f(0))] == [0]
    [two] = order.push(_f(2))
    assert dict(two.header.drops)["publish"] == 1 and order.streams["s"].lost == 1
    assert order.push(_f(1)) == []  # arriving after all: too late, a duplicate


def test_live_never_waits_and_counts_only_the_frames_no_stage_counted():
    order = Reorderer({"s": True})
    counted = Frame(Header("s", 3, drops=(("decode", 3),)), np.zeros((1, 1, 3), np.uint8))
    assert [m.header.seq for m in order.push(counted)] == [3]  # 0..2 dropped by decode, counted there
    assert order.streams["s"].lost == 0
    [late] = order.push(Frame(Header("s", 6, drops=(("decode", 4),)), np.zeros((1, 1, 3), np.uint8)))
    # 4 and 5 skipped, one of them counted by decode
    assert order.streams["s"].lost == 1 and dict(late.header.drops) == {"decode": 4, "publish": 1}
    assert order.push(_f(5)) == [] and order.streams["s"].duplicates == 1  # overtaken: already in the count
    # a restarted stage counts from 0 again: its previous life's 4 leave the total, publish keeps them
    [after] = order.push(Frame(Header("s", 9, drops=(("decode", 2),)), np.zeros((1, 1, 3), np.uint8)))
    assert order.streams["s"].lost == 1 + 4 and dict(after.header.drops) == {"decode": 2, "publish": 5}
    assert sum(dict(after.header.drops).values()) - sum(dict(late.header.drops).values()) == 9 - 6 - 1


# ----------------------------------------------------------------------------- infer




def _key(output):
    message = output.message if isinstance(output, Timed) else output
    if isinstance(message, EndOfStream):
        return (message.header.stream_id, message.header.seq, "end")
    return (message.header.stream_id, message.header.seq, message.boxes.tobytes(), message.mask_probs.tobytes())


@pytest.mark.parametrize("overlap", [False, True])
def test_infer_crops_give_postprocess_the_detections_of_the_probabilities(overlap):
    """infer.masks crops: the masks pasted and thresholded in the inference process, their crops only
    encoded by postprocess, give the Detections of the probabilities pasted by postprocess: boxes,
    scores, labels, names and crop boxes exactly; mask pixels alike except where the pasted
    probability lies within one float32 step of the threshold. Through the wire codec, as sent."""
    probs_stage, crops_stage = tiny_infer_stage(False), tiny_infer_stage(overlap, crops=True)
    post = PostprocessStage(PostprocessConfig(probs_stage.config.contract))
    limits = Limits(detections=10, input_hw=(128, 160), max_frame_side=320, raw_masks="crops")
    arrivals = [tiny_model_input(stream, seq) for seq in range(3) for stream in "ab"]
    arrivals.append(tiny_model_input("a", 3))  # a batch of one at the end of stream a
    probs, crops = [], []
    for message in [*arrivals, EndOfStream(Header("a", 4))]:
        probs += [out.message for out in probs_stage.process(message) if isinstance(out, Timed)]
        crops += [out.message for out in crops_stage.process(message) if isinstance(out, Timed)]
    assert [(m.header.stream_id, m.header.seq) for m in crops] == [(m.header.stream_id, m.header.seq) for m in probs]
    assert len(crops) == 7
    step, differing, total = float(np.finfo(np.float32).eps), 0, 0
    for raw, sent in zip(probs, crops):
        assert sent.mask_probs is None and raw.crop_boxes is None
        received = decode(encode(sent), limits)
        expected, got = post.process(raw), post.process(received)
        assert isinstance(expected, Detections) and isinstance(got, Detections)
        np.testing.assert_array_equal(received.boxes, raw.boxes)
        for field in ("boxes", "scores", "labels", "crop_boxes"):
            np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
        assert got.class_names == expected.class_names and got.frame_hw == expected.frame_hw
        assert len(got.rle_counts) == len(expected.rle_counts) == 10
        for i, crop_box in enumerate(expected.crop_boxes):
            x0, y0, x1, y1 = (int(v) for v in crop_box)
            masks = [decode_rle({"size": [y1 - y0, x1 - x0], "counts": d.rle_counts[i]}) for d in (expected, got)]
            pasted, origin = paste_mask_cropped(raw.mask_probs[i], expected.boxes[i], expected.frame_hw)
            assert origin == (x0, y0) and pasted.shape == masks[0].shape
            differ = masks[0] != masks[1]
            assert np.all(np.abs(pasted[differ] - np.float32(0.5)) <= step), (raw.header, i)
            differing, total = differing + int(differ.sum()), total + differ.size
    assert total > 10**5 and differing <= total * 1e-5


def test_infer_overlap_defaults_to_whether_the_runner_submits_asynchronously():
    """Unset, overlap follows the runner: on for torch on CUDA, off where submit() runs to the end
    (a batch held back there would only delay its results); asked for, it is on anywhere."""
    stage = tiny_infer_stage(None)
    assert not stage.runner.asynchronous and not stage.overlap
    assert tiny_infer_stage(True).overlap and not tiny_infer_stage(False).overlap
    shipped = load_config(RunConfig, CONFIG_DIR / "pipeline.yaml")
    assert shipped.infer.overlap is None and shipped.model.compile is None
    assert load_config(RunConfig, None, ["infer.overlap=true"]).infer.overlap is True


def test_infer_overlap_gives_the_same_results_one_batch_later_and_ends_streams_after_their_frames():
    """With overlap a batch's results leave when the next batch goes in (or on the idle flush),
    in order, each stamped from its submission; an end of stream drains what is in flight."""
    arrivals = [tiny_model_input("a", 0), tiny_model_input("b", 0), tiny_model_input("a", 1), tiny_model_input("b", 1),
                tiny_model_input("a", 2)]
    runs = {}
    for overlap in (False, True):
        stage, steps = tiny_infer_stage(overlap), []
        for message in arrivals:
            steps.append([_key(out) for out in stage.process(message)])
        steps.append([_key(out) for out in stage.process(EndOfStream(Header("a", 3)))])
        steps.append([_key(out) for out in stage.flush()])  # nothing left
        runs[overlap] = steps
        assert stage.idle_timeout_s is None and not stage.pending and stage.in_flight is None
    sync, overlapped = runs[False], runs[True]
    assert [len(step) for step in sync] == [0, 2, 0, 2, 0, 2, 0]  # a2 runs alone at the end of stream a
    assert [len(step) for step in overlapped] == [0, 0, 0, 2, 0, 4, 0]  # a batch later; the end drains both
    assert sum(sync, []) == sum(overlapped, [])  # same frames, same order, same outputs

    stage = tiny_infer_stage(True)
    before = time.monotonic()
    assert stage.process(tiny_model_input("a", 0)) == [] and stage.process(tiny_model_input("a", 1)) == []
    assert stage.in_flight is not None and stage.idle_timeout_s == stage.config.batch_timeout_s
    idle = stage.flush()  # nothing arrived for batch_timeout_s: the batch in flight comes out
    assert [_key(out)[:2] for out in idle] == [("a", 0), ("a", 1)]
    assert all(isinstance(out, Timed) and before <= out.start <= time.monotonic() for out in idle)
    assert stage.idle_timeout_s is None
