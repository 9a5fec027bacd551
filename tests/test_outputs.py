"""Offline outputs on real files: JSONL, COCO results read back by pycocotools, annotated video."""
from __future__ import annotations

import contextlib
import io
import json

import av
import numpy as np
import pytest
from maskstream.model.rle import decode_box_cropped_rle, encode_rle
from maskstream.pipeline.client import from_json
from maskstream.pipeline.media.outputs import (
    AnnotatedVideoWriter,
    CocoResultsWriter,
    JsonlWriter,
    OutputError,
)
from maskstream.pipeline.media.video import clip_frame_number, write_test_clip
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.make_detections import CLASS_NAMES, FRAME_HW, end_of_stream, make_detections

FRAMES = 20


def decode_video(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_jsonl_flushes_every_line_and_records_gaps(tmp_path):
    path = tmp_path / "deep" / "results.jsonl"
    sent = {seq: make_detections("cam0", seq) for seq in (0, 1, 3)}
    with JsonlWriter(path) as writer:
        for det, _ in sent.values():
            writer.write(det)
        # Readable before close: what a crash would leave behind.
        assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [0, 1, 3]
        writer.write(end_of_stream("cam0", 4))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(ln["kind"], ln["seq"], ln["gap"]) for ln in lines] == [
        ("Detections", 0, 0), ("Detections", 1, 0), ("Detections", 3, 1), ("EndOfStream", 4, 0)
    ]
    for line in lines[:3]:
        full = sent[line["seq"]][1]
        for i, det in enumerate(line["detections"]):
            assert isinstance(det["mask"]["rle"]["counts"], str)
            mask = decode_box_cropped_rle(det["mask"]["rle"], det["mask"]["crop_box"], (line["height"], line["width"]))
            np.testing.assert_array_equal(mask, full[i])


def test_jsonl_names_the_path_it_cannot_open(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=f"{tmp_path / 'file' / 'x.jsonl'}: cannot create its directory"):
        JsonlWriter(tmp_path / "file" / "x.jsonl")


def coco_ground_truth(seqs) -> COCO:
    """A COCO ground truth holding exactly the instances make_detections produces."""
    images, annotations = [], []
    for seq in seqs:
        images.append({"id": seq, "height": FRAME_HW[0], "width": FRAME_HW[1], "file_name": f"{seq}.png"})
        for label, mask in zip((1, 2), make_detections("cam0", seq)[1]):
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": seq, "category_id": label, "iscrowd": 0,
                "segmentation": encode_rle(mask), "area": float(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
            })
    coco = COCO()
    coco.dataset = {
        "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(CLASS_NAMES) if i],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_results_load_in_pycocotools_and_score_perfectly_against_their_own_masks(tmp_path):
    path = tmp_path / "coco_results.json"
    seqs = [0, 1, 2, 5]
    with CocoResultsWriter(path) as writer:
        for seq in seqs:
            writer.write(make_detections("cam0", seq)[0])
        writer.write(end_of_stream("cam0", 6))
        assert not path.exists()  # written whole at close, never half
    results = json.loads(path.read_text())
    assert len(results) == 2 * len(seqs)
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "bbox", "score"}

    gt = coco_ground_truth(seqs)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(path))
        for iou_type in ("segm", "bbox"):
            evaluation = COCOeval(gt, dt, iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            assert evaluation.stats[0] == pytest.approx(1.0), iou_type  # AP@[.5:.95]: the masks are exact


def test_coco_results_are_kept_when_the_block_fails_and_streams_need_ids(tmp_path):
    path = tmp_path / "coco.json"
    with pytest.raises(RuntimeError, match="pipeline died"):
        with CocoResultsWriter(path) as writer:
            writer.write(make_detections("cam0", 0)[0])
            raise RuntimeError("pipeline died")
    assert [r["image_id"] for r in json.loads(path.read_text())] == [0, 0]

    with CocoResultsWriter(tmp_path / "two.json") as writer:
        writer.write(make_detections("cam0", 0)[0])
        with pytest.raises(ValueError, match="streams 'cam0' and 'cam1' would share image ids"):
            writer.write(make_detections("cam1", 0)[0])

    ids = {"cam0": 0, "cam1": 1000}
    with CocoResultsWriter(tmp_path / "ids.json", image_id_of=lambda h: ids[h.stream_id] + h.seq) as writer:
        writer.write(make_detections("cam0", 3)[0])
        writer.write(make_detections("cam1", 3)[0])
    assert [r["image_id"] for r in json.loads((tmp_path / "ids.json").read_text())] == [3, 3, 1003, 1003]

    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=f"{tmp_path / 'file' / 'coco.json'}: cannot create its directory"):
        CocoResultsWriter(tmp_path / "file" / "coco.json")


@pytest.fixture(scope="module")
def source_clip(tmp_path_factory):
    return write_test_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=FRAMES, size=(160, 120))


def test_annotated_video_pairs_frames_by_seq_and_keeps_dropped_frames_undrawn(source_clip, tmp_path):
    out = tmp_path / "annotated.mp4"
    dropped = {5, 6, 12}
    sent = {}
    with AnnotatedVideoWriter(out, source_clip) as writer:
        for seq in range(FRAMES):
            if seq not in dropped:
                sent[seq] = make_detections("cam0", seq)
                writer.write(sent[seq][0])
        writer.write(end_of_stream("cam0", FRAMES))
    source, annotated = decode_video(source_clip), decode_video(out)
    assert len(annotated) == len(source) == FRAMES
    assert [clip_frame_number(f) for f in annotated] == list(range(FRAMES))  # frame n is source frame n
    for seq in range(FRAMES):
        diff = np.abs(annotated[seq].astype(np.int16) - source[seq].astype(np.int16)).mean(axis=-1)
        if seq in dropped:
            assert diff.mean() < 4, seq  # only compression noise
        else:
            union = sent[seq][1].any(axis=0)
            assert diff[union].mean() > 20, seq  # the masks are tinted in
            # far from the boxes (and the labels drawn above them) the frame is the source's
            near = np.zeros(FRAME_HW, bool)
            for x0, y0, x1, y1 in sent[seq][0].crop_boxes:
                near[max(0, y0 - 20) : y1 + 4, max(0, x0 - 4) : x1 + 60] = True
            assert diff[~near].mean() < 4, seq


def test_annotated_video_without_end_keeps_what_was_written_and_rejects_bad_input(source_clip, tmp_path):
    out = tmp_path / "partial.mkv"
    with AnnotatedVideoWriter(out, source_clip, fps=5) as writer:
        writer.write(make_detections("cam0", 0)[0])
        writer.write(make_detections("cam0", 3)[0])
        with pytest.raises(ValueError, match="seq 1 arrived after frame 3 was written"):
            writer.write(make_detections("cam0", 1)[0])
        with pytest.raises(ValueError, match="annotates stream 'cam0', got a message of stream 'cam1'"):
            writer.write(make_detections("cam1", 4)[0])
        with pytest.raises(ValueError, match=r"frame size \(60, 80\), the source .* is \(120, 160\)"):
            writer.write(make_detections("cam0", 4, frame_hw=(60, 80))[0])
        with pytest.raises(ValueError, match=f"ended after {FRAMES} frames, but stream 'cam0' has seq 99"):
            writer.write(make_detections("cam0", 99)[0])
    assert len(decode_video(out)) == FRAMES  # the failed seq 99 wrote every source frame on its way

    with AnnotatedVideoWriter(out, source_clip) as writer:
        writer.write(make_detections("cam0", 2)[0])
    assert len(decode_video(out)) == 3  # closed without EndOfStream: ends at the last frame written

    with pytest.raises(ValueError, match="source 'rtsp://cam/1' is not a video file"):
        AnnotatedVideoWriter(out, "rtsp://cam/1")


def test_jsonl_resumed_keeps_complete_lines_cuts_a_torn_one_and_appends(tmp_path):
    """What a restarted publish stage does with the journal a killed one left (docs/delivery.md)."""
    path = tmp_path / "results.jsonl"
    with JsonlWriter(path) as writer:
        for seq in (0, 1):
            writer.write(make_detections("cam0", seq)[0])
    kept = path.read_text()
    with path.open("a") as file:
        file.write('{"kind":"Detections","stream_id":"cam0","seq":2,"pts')  # the kill came mid-line
    with JsonlWriter(path, resume=True) as writer:
        assert [r["seq"] for r in writer.recovered] == [0, 1] and writer.lines_written == 2
        assert path.read_text() == kept  # cut back to the last complete line, nothing else touched
        record = writer.write(make_detections("cam0", 3)[0])
        writer.write(end_of_stream("cam0", 4))
    assert record["seq"] == 3 and record["gap"] == 1  # the gap counts on from the lines kept
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.read_text().startswith(kept) and [ln["seq"] for ln in lines] == [0, 1, 3, 4]
    message = from_json(lines[2])
    det = make_detections("cam0", 3)[0]
    assert message.header.seq == 3 and message.class_names == det.class_names and message.rle_counts == det.rle_counts
    np.testing.assert_array_equal(message.crop_boxes, det.crop_boxes)
    np.testing.assert_allclose(message.boxes, det.boxes, atol=0.005)


def test_jsonl_resumed_refuses_a_file_that_is_not_maskstream_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"kind":"Detections"}\nnot json\n')
    with pytest.raises(OutputError, match=f"{path}: line 1 is not a maskstream JSON line"):
        JsonlWriter(path, resume=True)
    assert JsonlWriter(tmp_path / "absent.jsonl", resume=True).recovered == []  # nothing to resume: a new file


def test_coco_results_are_in_image_id_order_whatever_order_they_came_in(tmp_path):
    path = tmp_path / "coco.json"
    with CocoResultsWriter(path, image_id_of=lambda h: (0 if h.stream_id == "a" else 100) + h.seq) as writer:
        for stream, seq in (("b", 0), ("a", 1), ("a", 0), ("b", 1)):
            writer.write(make_detections(stream, seq)[0])
    assert [r["image_id"] for r in json.loads(path.read_text())] == [0, 0, 1, 1, 100, 100, 101, 101]
