"""Internal sockets treat input as hostile: each class of crafted input is refused before any stage
uses it, with a reason naming the field; ZeroMQ drops frames larger than a socket's messages can
be before reading them; a stage process lives through all of it and keeps serving."""
from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import re
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.run_config import RunConfig, plan
from maskstream.pipeline.runtime.messages import (
    UNBOUNDED,
    Detections,
    EndOfStream,
    Frame,
    Header,
    Limits,
    MessageError,
    ModelInput,
    RawDetections,
    StageStamp,
    decode,
    encode,
)
from maskstream.pipeline.runtime.shm_ring import Ring, RingReaders
from maskstream.pipeline.runtime.stage import Stage, Timed, Wiring, run_stage
from maskstream.pipeline.runtime.transport import REPORT_MAX_BYTES, Inbox, Outbox, ReportInbox, pack, unpack

from tests.raw_zmtp import dropped, zmtp_push
from tests.tiny_models import tiny_infer_stage, tiny_model_input

NAMES = ("bg", "person", "car")
LIMITS = Limits(streams=("cam",), max_frame_side=640, input_hw=(128, 160), detections=5, class_names=NAMES,
                same_host=True)
HEADER = Header("cam", 7, 0.25, (StageStamp("source", 10.0, 10.0), StageStamp("decode", 10.0, 10.5)),
                (("source", 0), ("decode", 1)))


def _boxes(n: int, h: float, w: float) -> np.ndarray:
    rng = np.random.default_rng(n)
    x0, y0 = rng.random(n) * w / 2, rng.random(n) * h / 2
    return np.stack([x0, y0, x0 + rng.random(n) * w / 2, y0 + rng.random(n) * h / 2], axis=1).astype(np.float32)


def valid(kind: str, n: int = 3) -> object:
    """A well-formed message of `kind` within LIMITS."""
    if kind == "Frame":
        return Frame(HEADER, np.zeros((160, 160, 3), np.uint8))
    if kind == "yuv":
        return Frame(HEADER, np.zeros((180, 160), np.uint8), "yuv420p")
    if kind == "ModelInput":
        return ModelInput(HEADER, np.zeros((3, 128, 160), np.uint8), (120, 160), (240, 320))
    if kind == "RawDetections":
        return RawDetections(HEADER, _boxes(n, 120, 160), np.full(n, 0.5, np.float32), np.ones(n, np.int64),
                             np.full((n, 28, 28), 0.5, np.float32), (120, 160), (240, 320))
    if kind == "RawCrops":  # RawDetections with the masks as crops (infer.masks crops)
        crops = _boxes(n, 240, 320).astype(np.int32)
        pixels = int(((crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1])).sum())
        return RawDetections(HEADER, _boxes(n, 120, 160), np.full(n, 0.5, np.float32), np.ones(n, np.int64), None,
                             (120, 160), (240, 320), crops, np.packbits(np.arange(pixels) % 3 == 0))
    if kind == "Detections":
        boxes = _boxes(n, 240, 320)
        return Detections(HEADER, (240, 320), boxes, np.full(n, 0.5, np.float32), np.full(n, 2, np.int32),
                          ("car",) * n, boxes.astype(np.int32), (b"0123",) * n)
    return EndOfStream(HEADER, "")


def wire(message: object) -> list[bytes]:
    """Internal-wire frames, every buffer inline: [topic, header, slots, buffers...]."""
    topic, header, *buffers = encode(message)  # type: ignore[arg-type]
    return [bytes(topic), bytes(header), b"", *(bytes(b) for b in buffers)]


def edited(message: object, edit) -> list[bytes]:
    """`message`'s frames with edit(fields, buffers) applied to its header fields and buffer frames."""
    topic, header, slots, *buffers = wire(message)
    meta = msgpack.unpackb(header)
    edit(meta["fields"], buffers)
    return [topic, msgpack.packb(meta, use_bin_type=True), slots, *buffers]


def refused(frames: list[bytes], limits: Limits = LIMITS, readers: RingReaders | None = None) -> str:
    with pytest.raises(MessageError) as caught:
        unpack(frames, readers or RingReaders(()), limits)
    reason = str(caught.value)
    if readers is not None:  # the traceback's frames hold views of a slot: gone before the ring is closed
        del caught
        gc.collect()
    return reason


KINDS = ("Frame", "yuv", "ModelInput", "RawDetections", "RawCrops", "Detections", "EndOfStream")


@pytest.mark.parametrize("kind", KINDS)
def test_valid_messages_of_every_kind_pass_the_run_limits(kind):
    message = valid(kind)
    received = unpack(wire(message), RingReaders(()), LIMITS)
    assert type(received.message) is type(message) and received.message.header == HEADER
    for n in (0, 5):  # no instances, and K of them
        if kind in ("RawDetections", "RawCrops", "Detections"):
            assert unpack(wire(valid(kind, n)), RingReaders(()), LIMITS).message.boxes.shape == (n, 4)


# ------------------------------------------------------------------ shapes against buffer sizes


def _shape(field: str, shape: list[int]):
    def edit(fields, buffers):
        fields[field]["shape"] = shape
    return edit


@pytest.mark.parametrize("kind, field, shape, reason", [
    # the issue's message: [2**62, 4] with an empty buffer; 2**62 * 4 * 4 bytes wraps to 0 in int64
    ("RawDetections", "boxes", [2**62, 4],
     r"RawDetections.boxes: buffer 0 holds 48 bytes, float32\[4611686018427387904, 4\] needs 73786976294838206464"),
    ("Frame", "image", [2**32, 2**32, 3], r"Frame.image: buffer 0 holds 76800 bytes, .*needs 55340232221128654848"),
    ("Frame", "image", [120, 160, -3], r"Frame.image: shape \[120, 160, -3\]: expected a list of at most 4 ints >= 0"),
    ("Frame", "image", [1, 1, 1, 1, 76800], r"Frame.image: shape .*at most 4 ints"),
    ("Frame", "image", [120, True, 480], r"Frame.image: shape .*ints >= 0"),
    ("ModelInput", "image", [3, 160, 128],
     r"ModelInput.image: expected uint8 \[3, 128, 160\], got uint8 \[3, 160, 128\]"),
    ("RawDetections", "scores", [1, 3], r"RawDetections.scores: expected float32 \[3\], got float32 \[1, 3\]"),
])
def test_shapes_are_checked_against_buffer_sizes_in_python_ints(kind, field, shape, reason):
    with pytest.raises(MessageError, match=reason):
        unpack(edited(valid(kind), _shape(field, shape)), RingReaders(()), LIMITS)


def test_an_empty_buffer_with_a_huge_declared_shape_is_refused_without_allocating():
    def edit(fields, buffers):
        fields["boxes"]["shape"] = [2**62, 4]
        buffers[0] = b""
    frames = edited(valid("RawDetections", 0), edit)
    assert sum(len(f) for f in frames) < 1024  # a small crafted message, as in the issue
    assert "RawDetections.boxes: buffer 0 holds 0 bytes" in refused(frames)


# ------------------------------------------------------------------ dtypes from an allow-list


@pytest.mark.parametrize("dtype", ["V0", "V8", "O", "<U4", "(2,)<f4", ">f4", "<f8", "<c8", "?", "M8[s]", "", 7, None])
def test_dtypes_outside_the_allow_list_are_refused_before_numpy_parses_them(dtype):
    def edit(fields, buffers):
        fields["image"]["dtype"] = dtype
    reason = refused(edited(valid("Frame"), edit))
    assert reason.startswith(f"Frame.image: dtype {dtype!r} is not one a message carries")


@pytest.mark.parametrize("kind, field, dtype, reason", [
    ("RawDetections", "boxes", "<i4", r"RawDetections.boxes: expected float32 \[3, 4\], got int32 \[3, 4\]"),
    ("RawDetections", "mask_probs", "<i4", r"RawDetections.mask_probs: expected float32"),
    ("Detections", "labels", "<f4", r"Detections.labels: expected int32 \[3\], got float32"),
    ("Detections", "crop_boxes", "<f4", r"Detections.crop_boxes: expected int32"),
    ("ModelInput", "image", "<i4", r"ModelInput.image: expected uint8"),
])
def test_each_field_takes_only_its_own_dtypes(kind, field, dtype, reason):
    def edit(fields, buffers):  # the same bytes as another dtype the messages allow
        fields[field]["dtype"] = dtype
        if field == "image":  # uint8 -> int32: a quarter of the elements
            fields[field]["shape"] = [3, 128, 40]
    frames = edited(valid(kind), edit)
    with pytest.raises(MessageError, match=reason):
        unpack(frames, RingReaders(()), LIMITS)


# ------------------------------------------------------------------ ring references


@pytest.fixture
def ring():
    made = Ring.create(f"msk-test-{os.getpid()}-hostile", 2, 160 * 160 * 3)
    yield made
    gc.collect()  # views of its slots that tracebacks held
    made.close(unlink=True)


def _in_ring(ring: Ring, message: object, edit=None) -> list[bytes]:
    """`message`'s internal-wire frames with its buffer in a slot of `ring`; edit(entry) changes the slot reference."""
    frames, refs = pack(message, ring)  # type: ignore[arg-type]
    assert len(refs) == 1
    frames = [bytes(f) for f in frames]
    if edit is not None:
        table = msgpack.unpackb(frames[2], strict_map_key=False)
        edit(table)
        frames[2] = msgpack.packb(table)
    return frames


def test_a_genuine_slot_reference_of_a_ring_the_stage_reads_passes(ring):
    readers = RingReaders((ring.name,))
    received = unpack(_in_ring(ring, valid("Frame")), readers, LIMITS)
    assert received.message.image.shape == (160, 160, 3)
    received.release()
    del received
    assert ring.busy_slots() == 0
    readers.close()


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t[0].__setitem__(0, "a/b"), r"buffer 0: ring 'a/b' is not a ring this stage reads"),
    (lambda t: t[0].__setitem__(0, "/dev/shm/x"), r"ring '/dev/shm/x' is not a ring this stage reads"),
    (lambda t: t[0].__setitem__(1, 2), r"no slot 2 of 76800 bytes \(ring: 2 slots"),
    (lambda t: t[0].__setitem__(1, -1), r"no slot -1 of"),
    (lambda t: t[0].__setitem__(3, 10**9), r"no slot 0 of 1000000000 bytes"),
    (lambda t: t[0].__setitem__(2, 12345), r"slot 0: reclaimed by its producer before it was read"),
    (lambda t: t[0].__setitem__(3, 76799), r"Frame.image: buffer 0 holds 76799 bytes"),
    (lambda t: t[0].__setitem__(2, "1"), r"slot table: bad entry 0"),
    (lambda t: t.__setitem__(1, t[0]), r"slot table: bad entry 1"),
    (lambda t: t.__setitem__(0, t[0][:3]), r"slot table: bad entry 0"),
])
def test_ring_references_must_be_genuine_slots_of_the_rings_the_stage_reads(ring, edit, reason):
    readers = RingReaders((ring.name,))
    try:  # refused() keeps no traceback, whose frames would hold a view of the slot past close()
        assert re.search(reason, refused(_in_ring(ring, valid("Frame"), edit), readers=readers))
    finally:
        readers.close()


def test_a_ring_of_another_run_is_refused_without_being_opened(ring):
    readers = RingReaders(("maskstream-1-x-decode-0",))  # this stage reads only its own run's ring
    assert "is not a ring this stage reads (maskstream-1-x-decode-0)" in refused(_in_ring(ring, valid("Frame")),
                                                                               readers=readers)
    assert readers._rings == {}  # nothing attached


def test_a_slot_reference_with_data_in_its_frame_too_is_refused(ring):
    frames = _in_ring(ring, valid("Frame"))
    frames[3] = bytes(160 * 160 * 3)
    assert "buffer 0 travels in a ring slot, yet its frame holds 76800 bytes" in refused(
        frames, readers=RingReaders((ring.name,)))


def test_a_refused_message_gives_back_the_genuine_slot_it_held(ring):
    frames = _in_ring(ring, valid("Frame"))
    meta = msgpack.unpackb(frames[1])
    meta["fields"]["header"]["stream_id"] = "intruder"
    frames[1] = msgpack.packb(meta, use_bin_type=True)
    frames[0] = b"intruder"
    readers = RingReaders((ring.name,))
    assert "Frame.header.stream_id: 'intruder' is not a stream of this run" in refused(frames, readers=readers)
    assert ring.busy_slots() == 0
    readers.close()


def test_ring_generations_start_at_random():
    """A made-up reference (generation 0, as every slot of every ring had before) names no slot."""
    a, b = (Ring.create(f"msk-test-{os.getpid()}-gen{i}", 4, 16) for i in range(2))
    try:
        generations = {int(g) for r in (a, b) for g in r.meta[:, 0]}
        assert len(generations) == 8 and 0 not in generations
    finally:
        a.close(unlink=True)
        b.close(unlink=True)


# ------------------------------------------------------------------ sizes within the run's maxima


@pytest.mark.parametrize("message, reason", [
    (Frame(HEADER, np.zeros((700, 10, 3), np.uint8)),
     r"Frame.image: \[700, 10\]: expected sides >= 1, at most \[640, 640\] \(transport.max_frame_side\)"),
    (Frame(HEADER, np.zeros((1050, 700), np.uint8), "yuv420p"), r"Frame.image: \[700, 700\]: .*at most \[640, 640\]"),
    (Frame(HEADER, np.zeros((0, 10, 3), np.uint8)), r"Frame.image: \[0, 10\]: expected sides >= 1"),
    (ModelInput(HEADER, np.zeros((3, 128, 160), np.uint8), (120, 160), (641, 320)),
     r"ModelInput.frame_hw: \[641, 320\]"),
    (valid("RawDetections", 6), r"RawDetections.boxes: 6 instances, this run's model gives at most K = 5"),
    (valid("Detections", 6), r"Detections.boxes: 6 instances, this run's model gives at most K = 5"),
    (dataclasses.replace(valid("RawDetections"), mask_probs=np.zeros((3, 14, 14), np.float32)),
     r"RawDetections.mask_probs: expected float32 \[3, 28, 28\], got float32 \[3, 14, 14\]"),
    (dataclasses.replace(valid("RawDetections"), frame_hw=(480, 1000)), r"RawDetections.frame_hw: \[480, 1000\]"),
    (dataclasses.replace(valid("Detections"), frame_hw=(1000, 480)), r"Detections.frame_hw: \[1000, 480\]"),
    (EndOfStream(HEADER, "x" * 70000), r"EndOfStream.error: 70000 characters, at most 65536"),
])
def test_sizes_beyond_the_run_maxima_are_refused(message, reason):
    with pytest.raises(MessageError, match=reason):
        unpack(wire(message), RingReaders(()), LIMITS)


# ------------------------------------------------------------------ valid_hw within the input


@pytest.mark.parametrize("kind, valid_hw", [
    ("ModelInput", (0, 0)), ("ModelInput", (129, 160)), ("ModelInput", (120, 161)), ("ModelInput", (-1, 5)),
    ("RawDetections", (0, 0)), ("RawDetections", (120, 161)),
])
def test_valid_hw_must_lie_inside_the_input(kind, valid_hw):
    message = dataclasses.replace(valid(kind, 0), valid_hw=valid_hw)
    assert refused(wire(message)).startswith(f"{kind}.valid_hw: {list(valid_hw)}: expected sides >= 1, at most")




def _key(output: Any) -> tuple[Any, ...]:
    """What identifies an inference result: its frame, boxes and masks."""
    message = output.message if isinstance(output, Timed) else output
    return (message.header.stream_id, message.header.seq, message.boxes.tobytes(), message.mask_probs.tobytes())


def test_inference_refuses_a_frame_outside_its_input_before_it_joins_the_batch():
    """The issue: valid_hw [0, 0] made the runner raise after the frame joined the batch, and the
    full batch was never cleared (every later frame: IndexError). Refused first, it fails alone."""
    stage, fresh = tiny_infer_stage(), tiny_infer_stage()
    first = tiny_model_input("a", 0)
    assert stage.process(first) == []
    for bad in (dataclasses.replace(tiny_model_input("a", 1), valid_hw=(0, 0)),
                dataclasses.replace(tiny_model_input("a", 1), valid_hw=(999, 4)),
                dataclasses.replace(tiny_model_input("a", 1), image=np.zeros((3, 8, 8), np.uint8))):
        with pytest.raises(ValueError, match="valid_hw|image"):
            stage.process(bad)
        assert stage.pending == [first]
    later = [tiny_model_input("a", 1), tiny_model_input("a", 2), tiny_model_input("a", 3)]
    got = [_key(out) for m in later for out in stage.process(m)]
    assert got == [_key(out) for m in (first, *later) for out in fresh.process(m)]


def test_inference_starts_an_empty_batch_after_the_runner_fails_one():
    """A batch whose run raises (here: a valid_hw the runner cannot take, slipped past process())
    costs its own frames only: the next batch starts empty and runs."""
    stage, fresh = tiny_infer_stage(), tiny_infer_stage()
    stage.pending = [dataclasses.replace(tiny_model_input("a", 0), valid_hw=(0, 0))]
    stage.images[0] = 0
    with pytest.raises(RuntimeError, match=r"the batch of a#0 failed"):
        stage.flush()
    assert stage.pending == []
    frames = [tiny_model_input("a", 1), tiny_model_input("a", 2)]
    assert [_key(o) for m in frames for o in stage.process(m)] == [_key(o) for m in frames for o in fresh.process(m)]


# ------------------------------------------------------------------ names, kinds, truncations, extra frames


@pytest.mark.parametrize("frames, limits, reason", [
    (wire(dataclasses.replace(valid("Frame"), header=dataclasses.replace(HEADER, stream_id="other"))), LIMITS,
     r"Frame.header.stream_id: 'other' is not a stream of this run"),
    (wire(dataclasses.replace(valid("Frame"), header=dataclasses.replace(HEADER, stream_id=""))), UNBOUNDED,
     r"Frame.header.stream_id: expected 1 to 256 characters, got 0"),
    ([b"other", *wire(valid("Frame"))[1:]], LIMITS, r"Frame: topic b'other' does not match stream id 'cam'"),
    (wire(valid("Detections")), dataclasses.replace(LIMITS, kinds=("Frame", "EndOfStream")),
     r"header: kind Detections is not taken here \(this inbox takes Frame, EndOfStream\)"),
    (wire(valid("Frame"))[:1], LIMITS, r"got 1 frame\(s\)"),
    ([*wire(valid("Frame"))[:2], b""], LIMITS, r"Frame.image: buffer 0 missing, the message has 0 buffer"),
    ([wire(valid("Frame"))[0], wire(valid("Frame"))[1][:-7], *wire(valid("Frame"))[2:]], LIMITS, r"not valid msgpack"),
    ([*wire(valid("Frame"))[:3], wire(valid("Frame"))[3][:-1]], LIMITS, r"Frame.image: buffer 0 holds 76799 bytes"),
    ([*wire(valid("Frame")), b"extra"], LIMITS, r"Frame: 2 buffer frame\(s\), the fields reference 1"),
    ([*wire(valid("EndOfStream")), b""], LIMITS, r"EndOfStream: 1 buffer frame\(s\), the fields reference 0"),
    ([*wire(valid("Frame")), *[b""] * 5], LIMITS, r"at most 5 buffers, got 9 frame\(s\)"),
    (edited(valid("Detections"), lambda f, b: f["scores"].update(nd=0)), LIMITS, r"Detections.scores: buffer 0 is "
                                                                                 r"referenced twice"),
    (edited(valid("Frame"), lambda f, b: f.update(kind=1)), LIMITS, r"Frame.kind: unknown key"),
    ([b"cam", msgpack.packb({"v": 1, "kind": "Exec", "fields": {}}), b""], LIMITS, r"header: unknown kind 'Exec'"),
    ([b"cam", msgpack.packb({"v": True, "kind": "Frame", "fields": {}}), b""], LIMITS, r"header: schema version True"),
])
def test_names_kinds_truncations_and_extra_frames(frames, limits, reason):
    with pytest.raises(MessageError, match=reason):
        unpack(frames, RingReaders(()), limits)


# ------------------------------------------------------------------ every other field's values


def _header(**changes):
    return lambda m: dataclasses.replace(m, header=dataclasses.replace(HEADER, **changes))


def _field(**changes):
    return lambda m: dataclasses.replace(m, **changes)


@pytest.mark.parametrize("kind, change, reason", [
    ("Frame", _header(seq=-1), r"Frame.header.seq: -1 is outside \[0, 2\*\*53\)"),
    ("Frame", _header(seq=2**63), r"Frame.header.seq: 9223372036854775808 is outside"),
    ("Frame", _header(pts_s=float("nan")), r"Frame.header.pts_s: nan is not a finite number"),
    ("Frame", _header(stamps=(StageStamp("decode", 2.0, 1.0),)), r"Frame.header.stamps\[0\]: start 2.0, end 1.0"),
    ("Frame", _header(stamps=(StageStamp("decode", 1.0, float("inf")),)), r"Frame.header.stamps\[0\]: start 1.0"),
    ("Frame", _header(stamps=(StageStamp("", 1.0, 1.0),)), r"Frame.header.stamps\[0\].stage: expected 1 to 64"),
    ("Frame", lambda m: _header(stamps=(StageStamp("decode", 1.0, time.monotonic() + 60),))(m),  # now: when it runs
     r"Frame.header.stamps\[0\]: start 1.0, end .*: expected 0 <= start <= end, finite, not later than now"),
    ("Frame", _header(stamps=(StageStamp("d", 1.0, 1.0),) * 17), r"Frame.header.stamps: 17 stamps, at most 16"),
    ("Frame", _header(drops=(("decode", -1),)), r"Frame.header.drops\[0\]: expected \[stage name, count >= 0\]"),
    ("Frame", _field(pixel_format="bgr0"), r"Frame.pixel_format: 'bgr0': expected rgb24, yuv420p or yuvj420p"),
    ("yuv", _field(image=np.zeros((180, 161), np.uint8)), r"Frame.image: \[180, 161\]: expected I420 planes"),
    ("yuv", _field(image=np.zeros((120, 160, 3), np.uint8)), r"Frame.image: expected uint8 \[\*, \*\], got uint8 "
                                                             r"\[120, 160, 3\]"),
    ("RawDetections", _field(boxes=np.array([[0, 0, np.nan, 4]] * 3, np.float32)),
     r"RawDetections.boxes\[0\]: \[0.0, 0.0, nan, 4.0\] is not a box inside the 120x160 image"),
    ("RawDetections", _field(boxes=np.array([[9, 0, 4, 4]] * 3, np.float32)), r"RawDetections.boxes\[0\]"),
    ("RawDetections", _field(boxes=np.array([[0, 0, 1e30, 4]] * 3, np.float32)), r"RawDetections.boxes\[0\]"),
    ("RawDetections", _field(scores=np.array([0.5, 1.5, 0.5], np.float32)), r"RawDetections.scores: expected "
                                                                             r"scores in \[0, 1\]"),
    ("RawDetections", _field(labels=np.array([1, 3, 1])),
     r"RawDetections.labels: labels 1..3: expected 0 <= label < 3"),
    ("RawDetections", _field(labels=np.array([1, -2, 1])), r"RawDetections.labels: labels -2..1"),
    ("Detections", _field(class_names=("car", "person", "car")), r"Detections.class_names\[1\]: 'person' is not the "
                                                                  r"name of label 2"),
    ("Detections", _field(class_names=("car",)), r"Detections.class_names: 1 names and 3 RLEs for 3 instances"),
    ("Detections", _field(rle_counts=(b"0123", b"01 3", b"0123")), r"Detections.rle_counts\[1\]: not the compressed"),
    ("Detections", _field(rle_counts=(b"0" * 10**6,) * 3), r"Detections.rle_counts\[0\]: not the compressed RLE"),
    ("Detections", _field(crop_boxes=np.array([[0, 0, 321, 4]] * 3, np.int32)),
     r"Detections.crop_boxes\[0\]: \[0, 0, 321, 4\] is not a box inside the 240x320 image"),
    ("Detections", _field(boxes=np.array([[0, 0, 400, 4]] * 3, np.float32)), r"Detections.boxes\[0\]"),
    ("RawCrops", _field(mask_probs=np.zeros((3, 28, 28), np.float32), crop_boxes=None), r"RawDetections.mask_probs: "
     r"expected the masks as mask_probs, or as crop_boxes and crop_bits; got mask_probs and crop_bits"),
    ("RawCrops", _field(crop_bits=None), r"RawDetections.mask_probs: expected the masks .*; got crop_boxes$"),
    ("RawCrops", _field(crop_boxes=None, crop_bits=None), r"RawDetections.mask_probs: .*; got none of them"),
    ("RawDetections", _field(crop_boxes=np.zeros((3, 4), np.int32)), r"RawDetections.mask_probs: .*; got mask_probs "
                                                                     r"and crop_boxes$"),
    ("RawCrops", _field(crop_boxes=np.array([[0, 0, 321, 4]] * 3, np.int32)),
     r"RawDetections.crop_boxes\[0\]: \[0, 0, 321, 4\] is not a box inside the 240x320 image"),
    ("RawCrops", _field(crop_boxes=np.array([[5, 0, 4, 4]] * 3, np.int32)), r"RawDetections.crop_boxes\[0\]"),
    ("RawCrops", _field(crop_boxes=np.array([[0, -1, 4, 4]] * 3, np.int32)), r"RawDetections.crop_boxes\[0\]"),
    ("RawCrops", _field(crop_boxes=np.zeros((2, 4), np.int32)),
     r"RawDetections.crop_boxes: expected int32 \[3, 4\], got int32 \[2, 4\]"),
    ("RawCrops", _field(crop_boxes=np.zeros((3, 4), np.int64)), r"RawDetections.crop_boxes: expected int32"),
    # bits for crops of 10 pixels, or of 17: two bytes for 10 is right, one or three is not
    ("RawCrops", _field(crop_boxes=np.array([[0, 0, 2, 5], [0, 0, 0, 0], [3, 3, 3, 9]], np.int32),
                        crop_bits=np.zeros(3, np.uint8)),
     r"RawDetections.crop_bits: expected uint8 \[2\], got uint8 \[3\]"),
    ("RawCrops", _field(crop_boxes=np.array([[0, 0, 1, 17], [0, 0, 0, 0], [3, 3, 3, 9]], np.int32),
                        crop_bits=np.zeros(2, np.uint8)),
     r"RawDetections.crop_bits: expected uint8 \[3\], got uint8 \[2\]"),
    ("RawCrops", _field(crop_boxes=np.array([[0, 0, 2, 5], [0, 0, 0, 0], [3, 3, 3, 9]], np.int32),
                        crop_bits=np.array([0, 0b00100000], np.uint8)),
     r"RawDetections.crop_bits: the last byte's 6 spare bit\(s\) are not 0"),
    ("RawCrops", _field(crop_bits=np.zeros((1, 1), np.uint8)), r"RawDetections.crop_bits: expected uint8 \[\d+\]"),
])
def test_every_field_is_checked(kind, change, reason):
    with pytest.raises(MessageError, match=reason):
        unpack(wire(change(valid(kind))), RingReaders(()), LIMITS)


def test_a_refused_message_still_says_which_frame_it_claims_to_be_when_its_header_is_sound():
    frames = edited(valid("Frame"), _shape("image", [2**62]))
    with pytest.raises(MessageError) as caught:
        unpack(frames, RingReaders(()), LIMITS)
    assert caught.value.header == HEADER
    with pytest.raises(MessageError) as caught:
        unpack(wire(dataclasses.replace(valid("Frame"), header=dataclasses.replace(HEADER, seq=-1))), RingReaders(()),
               LIMITS)
    assert caught.value.header is None


def test_a_run_takes_only_the_mask_form_its_inference_sends_and_sizes_the_inbox_for_it():
    """infer.masks decides the form of RawDetections' masks: the other form is refused, and only a
    run whose inference sends crops lets the postprocess inbox take K frame-sized crops."""
    for kind, other in (("RawDetections", "crops"), ("RawCrops", "probs")):
        form = "probs" if kind == "RawDetections" else "crops"
        message = wire(valid(kind))
        received = unpack(message, RingReaders(()), dataclasses.replace(LIMITS, raw_masks=form)).message
        assert received.boxes.shape == (3, 4)
        with pytest.raises(MessageError, match=f"RawDetections.mask_probs: the masks as {form}, this run's inference "
                                               rf"sends {other} \(infer.masks\)"):
            unpack(message, RingReaders(()), dataclasses.replace(LIMITS, raw_masks=other))
    both = dataclasses.replace(valid("RawCrops"), mask_probs=np.zeros((3, 28, 28), np.float32))
    assert "at most 5 buffers, got 9 frame(s)" in refused(wire(both))  # the socket's framing refuses it first
    with pytest.raises(MessageError, match=r"mask_probs: .*; got mask_probs and crop_boxes and crop_bits"):
        decode(encode(both))
    inbox = dataclasses.replace(LIMITS, kinds=("RawDetections", "EndOfStream"), max_frame_side=4096)
    probs, crops = (dataclasses.replace(inbox, raw_masks=form).max_part_bytes() for form in ("probs", "crops"))
    assert probs is not None and crops is not None and probs < crops
    assert inbox.max_part_bytes() == crops  # "": either form
    full = np.ones((5, 4096, 4096), bool)  # K crops of the largest frame, each all of it
    biggest = RawDetections(HEADER, _boxes(5, 120, 160), np.full(5, 0.5, np.float32), np.ones(5, np.int64), None,
                            (120, 160), (4096, 4096), np.array([[0, 0, 4096, 4096]] * 5, np.int32), np.packbits(full))
    assert unpack(wire(biggest), RingReaders(()), inbox).message.crop_bits.nbytes == 5 * 4096 * 4096 // 8
    assert max(len(part) for part in wire(biggest)) <= crops
    with pytest.raises(ValueError, match="raw_masks: expected '', 'probs' or 'crops', got 'bits'"):
        Limits(raw_masks="bits")


def test_the_subscriber_default_checks_consistency_but_no_run_limits():
    big = Detections(Header("any", 0), (5000, 9000), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                     np.zeros(0, np.int32), (), np.zeros((0, 4), np.int32), ())
    assert decode(encode(big)).frame_hw == (5000, 9000)
    assert UNBOUNDED.max_part_bytes() is None
    with pytest.raises(MessageError, match="Detections.frame_hw: \\[0, 9000\\]"):
        decode(encode(dataclasses.replace(big, frame_hw=(0, 9000))))


# ------------------------------------------------------------------ ZMQ_MAXMSGSIZE


def test_zeromq_drops_a_frame_declared_larger_than_the_socket_allows_before_reading_it(tmp_path):
    """ZMQ_MAXMSGSIZE: the receiver hangs up on the 256 MiB frame's first bytes (without it, it
    would allocate it and wait for the rest), and goes on receiving from others."""
    for limit, expect_dropped in ((1 << 20, True), (None, False)):
        endpoint = f"ipc://{tmp_path}/inbox-{limit}"
        inbox = Inbox(endpoint, hwm=4, max_part_bytes=limit)
        try:
            peer = zmtp_push(endpoint[len("ipc://"):], 256 << 20, bytes(1024))
            assert dropped(peer, within_s=2.0) == expect_dropped
            peer.close()
            outbox = Outbox([endpoint], hwm=4)
            frames, _ = pack(valid("EndOfStream"))  # type: ignore[arg-type]
            assert outbox.send(frames, block=True)
            received = inbox.recv(5.0)
            assert received is not None and isinstance(unpack(received, RingReaders(())).message, EndOfStream)
            outbox.close()
        finally:
            inbox.close()


def test_every_receiving_socket_has_a_size_limit(tmp_path):
    reports = ReportInbox(f"ipc://{tmp_path}/reports")
    try:
        assert reports.socket.getsockopt(zmq.MAXMSGSIZE) == REPORT_MAX_BYTES
    finally:
        reports.close()
    clip = write_test_clip(tmp_path / "c.mp4", frames=2, size=(96, 64))
    cfg = RunConfig(sources=(str(clip),), workers=2)
    cfg = dataclasses.replace(cfg, transport=dataclasses.replace(cfg.transport, endpoint_dir=tmp_path))
    run = plan(cfg)
    try:
        wirings = {spec.name: spec.wiring for spec in run.specs}
        decode_rings = {wirings["decode.c"].ring}
        preprocess_rings = {wirings[f"preprocess.{i}"].ring for i in range(2)}
        assert set(run.streams) == {"c"}
        for name, wiring in wirings.items():
            if wiring.inbox is None:
                assert name.startswith("decode.")
                continue
            limits = wiring.limits
            assert limits.streams == ("c",) and limits.max_frame_side == cfg.transport.max_frame_side
            assert limits.max_part_bytes() is not None and len(limits.kinds) == 2 and "EndOfStream" in limits.kinds
        assert set(wirings["preprocess.0"].reads) == decode_rings and wirings["preprocess.0"].limits.kinds[0] == "Frame"
        assert set(wirings["infer.0"].reads) == preprocess_rings
        infer = wirings["infer.0"].limits
        assert infer.kinds[0] == "ModelInput" and infer.input_hw is not None and infer.detections is not None
        assert wirings["postprocess.1"].reads == () and wirings["publish.0"].reads == ()
        assert wirings["publish.0"].limits.kinds[0] == "Detections"
        assert wirings["postprocess.1"].limits.raw_masks == "probs"  # infer.masks: probs unless asked
    finally:
        run.close()


# ------------------------------------------------------------------ a stage process lives through it


class Echo(Stage):
    def process(self, message):
        return [message]


def test_a_stage_process_lives_through_the_crafted_messages_of_the_issue(tmp_path, ring):
    """The issue's 138-byte messages ([2**62, 4] with an empty buffer, dtype V0, ring "a/b") and
    valid_hw [0, 0] each crashed a stage; a frame sent after them all comes out, and the stage
    counted every one malformed, over real sockets in a spawned process."""
    limits = dataclasses.replace(LIMITS, kinds=("Frame", "ModelInput", "EndOfStream"))
    wiring = Wiring(stage="echo.0", reports=f"ipc://{tmp_path}/reports", inbox=f"ipc://{tmp_path}/inbox",
                    outboxes=(f"ipc://{tmp_path}/out",), heartbeat_s=0.2, parent_pid=os.getpid(), limits=limits,
                    reads=(ring.name,))
    reports, out = ReportInbox(wiring.reports), Inbox(wiring.outboxes[0], hwm=4)
    process = multiprocessing.get_context("spawn").Process(target=run_stage, args=(Echo, wiring))
    process.start()
    crafted = [
        edited(valid("Frame"), lambda f, b: (f["image"].update(shape=[2**62, 4]), b.__setitem__(0, b""))),
        edited(valid("Frame"), lambda f, b: (f["image"].update(dtype="V0", shape=[0]), b.__setitem__(0, b""))),
        _in_ring(ring, valid("Frame"), lambda t: t[0].__setitem__(0, "a/b")),
        wire(dataclasses.replace(valid("ModelInput"), valid_hw=(0, 0))),
        [b"cam", b"\xc1", b"", b"", b"", b"", b"", b"", b""],
    ]
    try:
        sender = Outbox([wiring.inbox], hwm=16)
        for frames in crafted:
            assert sender.send(frames, block=True)
        deadline = time.monotonic() + 60
        while not (tmp_path / "inbox").exists():  # bound once the spawned process has imported and started
            assert time.monotonic() < deadline and process.is_alive()
            time.sleep(0.1)
        oversized = zmtp_push(f"{tmp_path}/inbox", limits.max_part_bytes() + 1, bytes(4096))
        good, _ = pack(valid("Frame"))  # type: ignore[arg-type]
        assert sender.send(good, block=True)
        received = out.recv(60.0)
        assert received is not None and unpack(received, RingReaders(()), limits).message.header.seq == 7
        assert dropped(oversized, within_s=5.0)
        deadline, malformed = time.monotonic() + 30, 0
        while malformed < len(crafted) and time.monotonic() < deadline:
            for report, _ in reports.recv_all(0.5):
                malformed = report.malformed
        assert malformed == len(crafted) and process.is_alive()
        sender.close()
    finally:
        process.terminate()
        process.join(10)
        reports.close()
        out.close()
    assert process.exitcode == 0
