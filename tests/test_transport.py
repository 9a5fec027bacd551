"""Internal wire: inline buffers and shared-memory slots give the same message; garbage is a clear error."""
from __future__ import annotations

import dataclasses
import os
import time

import msgpack
import numpy as np
import pytest
from maskstream.pipeline.runtime.messages import (
    Frame,
    Header,
    LostFrame,
    MessageError,
    StageReport,
    StageStamp,
    StreamProgress,
    decode,
    decode_report,
    encode,
    encode_report,
)
from maskstream.pipeline.runtime.shm_ring import Ring, RingReaders
from maskstream.pipeline.runtime.stage import with_queued
from maskstream.pipeline.runtime.transport import Inbox, Outbox, pack, unpack


def test_frame_through_ring_and_inline_is_the_same():
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    message = Frame(Header("cam", 7, 0.25), image)
    ring = Ring.create(f"msk-test-{os.getpid()}-t", 2, image.nbytes)
    readers = RingReaders()
    try:
        for use in (None, ring):
            frames, refs = pack(message, use)
            assert (len(refs) == 1) == (use is not None)
            received = unpack(frames, readers)
            assert isinstance(received.message, Frame) and np.array_equal(received.message.image, image)
            received.release()
        assert ring.busy_slots() == 0
        del received  # its arrays are views of the mapping, which would then not close
    finally:
        readers.close()
        ring.close(unlink=True)


def test_a_claimed_slot_travels_by_reference_without_a_copy():
    ring = Ring.create(f"msk-test-{os.getpid()}-c", 2, 240 * 320 * 3)
    readers = RingReaders()
    try:
        image = np.frombuffer(ring.claim(240 * 320 * 3, timeout_s=0), dtype=np.uint8).reshape(240, 320, 3)
        image[:] = 9
        frames, refs = pack(Frame(Header("cam", 0), image), ring)
        assert len(refs) == 1 and ring.busy_slots() == 1  # the claimed slot itself, no second one
        received = unpack(frames, readers)
        assert np.shares_memory(received.message.image, readers.ring(ring.name).read(refs[0]))
        assert int(received.message.image.sum()) == 9 * image.size
        received.release()
        del received, image, frames  # views of the mapping, which would then not close
        assert ring.busy_slots() == 0
    finally:
        readers.close()
        ring.close(unlink=True)


@pytest.mark.parametrize("frames, what", [
    ([b"cam"], r"expected \[topic, header, slots, buffers\.\.\.\]"),
    ([b"cam", b"\xc1", b""], "not valid msgpack"),
    ([b"cam", b"\x80", b"\xc1"], "slot table is not valid msgpack"),
    ([b"cam", b"\x80", b"\x81\x00\x93\x01\x02\x03"], "slot table: bad entry"),
])
def test_malformed_internal_messages_say_what_is_wrong(frames, what):
    with pytest.raises(MessageError, match=what):
        unpack(frames, RingReaders())


def test_stage_report_round_trip():
    report = StageReport("decode.cam", 12, 3.5, received=1, streams=(StreamProgress("cam", 4, 1, 5, True, "x"),))
    assert decode_report(encode_report(report)) == report
    on_gpu = StageReport("infer.0", 13, 4.0, gpu_mb=5120.5)
    assert decode_report(encode_report(on_gpu)).gpu_mb == 5120.5
    with pytest.raises(MessageError):
        decode_report(b"\x01")


# The wire as this schema version wrote it before the header checks moved to configs/codec.py;
# subscribers built against it must keep reading it, byte for byte.
FRAME_HEADER = (
    "83a17601a46b696e64a54672616d65a66669656c647383a668656164657285a973747265616d5f6964a363616da373657107a57074"
    "735f73cb3fd0000000000000a67374616d70739183a57374616765a66465636f6465a57374617274cb3ff0000000000000a3656e64"
    "cb3ff8000000000000a564726f70739192a66465636f646502a5696d61676583a26e6400a56474797065a37c7531a5736861706593"
    "020303ac706978656c5f666f726d6174a57267623234"
)
# A StageReport as stages wrote it before reports said what the stage works on and what it lost
# (docs/delivery.md): still read, the new fields at their defaults.
REPORT_BEFORE_DELIVERY = (
    "83a17601a46b696e64ab53746167655265706f7274a66669656c64738da57374616765a7696e6665722e30a37069640ca773656e74"
    "5f6174cb400c000000000000a8726563656976656401a473656e7400a96d616c666f726d656400a66572726f727300aa6c6173745f"
    "6572726f72a0a6627573795f73cb0000000000000000a773747265616d739186a973747265616d5f6964a363616da66672616d6573"
    "04a564726f707301a86e6578745f73657105a5656e646564c3a56572726f72a178a5666174616ca0a66770755f6d62cb3ff8000000"
    "000000a87374617274696e67c2"
)
REPORT = (
    "83a17601a46b696e64ab53746167655265706f7274a66669656c6473de0010a57374616765a7696e6665722e30a37069640ca77365"
    "6e745f6174cb400c000000000000a8726563656976656401a473656e7400a96d616c666f726d656400a66572726f727300aa6c6173"
    "745f6572726f72a0a6627573795f73cb0000000000000000a773747265616d739186a973747265616d5f6964a363616da66672616d"
    "657304a564726f707301a86e6578745f73657105a5656e646564c3a56572726f72a178a5666174616ca0a66770755f6d62cb3ff800"
    "0000000000a87374617274696e67c2aa776f726b696e675f6f6eb04d6f64656c496e7075742063616d2335ad776f726b696e675f73"
    "696e6365cb400a000000000000a46c6f73749184a973747265616d5f6964a363616da373657103aa6465636f6465645f6174cb3ff0"
    "000000000000a6726561736f6eac696e6665722e303a20626164"
)


def test_wire_format_is_pinned():
    frame = Frame(Header("cam", 7, 0.25, stamps=(StageStamp("decode", 1.0, 1.5),), drops=(("decode", 2),)),
                  np.arange(18, dtype=np.uint8).reshape(2, 3, 3))
    topic, header, buffer = (bytes(f) for f in encode(frame))
    assert (topic, header.hex(), buffer) == (b"cam", FRAME_HEADER, bytes(range(18)))
    decoded = decode([topic, header, buffer])
    assert decoded.header == frame.header and np.array_equal(decoded.image, frame.image)
    report = StageReport("infer.0", 12, 3.5, received=1, streams=(StreamProgress("cam", 4, 1, 5, True, "x"),),
                         gpu_mb=1.5)
    assert decode_report(bytes.fromhex(REPORT_BEFORE_DELIVERY)) == report
    report = dataclasses.replace(report, working_on="ModelInput cam#5", working_since=3.25,
                                 lost=(LostFrame("cam", 3, 1.0, "infer.0: bad"),))
    assert encode_report(report).hex() == REPORT and decode_report(bytes.fromhex(REPORT)) == report


def _with_fields(edit) -> list[bytes]:
    """A valid Frame's frames with its header's fields edited."""
    topic, header, buffer = (bytes(f) for f in encode(Frame(Header("cam", 7, stamps=(StageStamp("d", 1.0, 2.0),)),
                                                            np.zeros((2, 2, 3), np.uint8))))
    meta = msgpack.unpackb(header)
    edit(meta["fields"])
    return [topic, msgpack.packb(meta, use_bin_type=True), buffer]


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["header"].update(seq="7"), "Frame.header.seq: expected int, got str '7'"),
    (lambda f: f["header"].update(seq=True), "Frame.header.seq: expected int, got bool True"),
    (lambda f: f["header"].update(pts_s="now"), "Frame.header.pts_s: expected float, got str 'now'"),
    (lambda f: f["header"]["stamps"][0].update(end=None), r"Frame.header.stamps\[0\].end: expected float, got null"),
    (lambda f: f["header"].update(drops=[["d", 1, 2]]), r"Frame.header.drops\[0\]: expected a list \[str, int\] \(2"),
    (lambda f: f["header"].update(colour=1), "Frame.header.colour: unknown key"),
    (lambda f: f.pop("header"), "Frame.header: missing required key"),
    (lambda f: f.update(pixel_format=b"rgb24"), "Frame.pixel_format: expected str, got bytes"),
    (lambda f: f.update(image={"nd": 3, "dtype": "|u1", "shape": [2, 2, 3]}), "Frame.image: buffer 3 missing"),
    (lambda f: f.update(image={"nd": 0, "dtype": "|u1", "shape": [2, 2, 4]}),
     "Frame.image: buffer 0 holds 12 bytes"),
])
def test_malformed_headers_name_the_field(edit, message):
    with pytest.raises(MessageError, match=message):
        decode(_with_fields(edit))


def test_a_report_field_of_the_wrong_type_is_refused():
    raw = msgpack.unpackb(encode_report(StageReport("s", 1, 2.0)))
    raw["fields"]["starting"] = "yes"  # a bool field: checked now, as every other type
    with pytest.raises(MessageError, match="StageReport.starting: expected bool, got str 'yes'"):
        decode_report(msgpack.packb(raw, use_bin_type=True))


def test_live_frames_overtaken_in_the_queue_are_marked_and_the_rest_kept_in_order(tmp_path):
    """Real PUSH/PULL sockets: what waits in the inbox behind a received message is taken at once;
    a live stream's frame with a newer one of its stream behind it is overtaken, others are not."""
    endpoint = f"ipc://{tmp_path}/inbox"
    inbox, outbox = Inbox(endpoint, hwm=8), Outbox([endpoint], hwm=8)
    try:
        sent = [("cam", 0), ("file", 0), ("cam", 1), ("file", 1), ("cam", 2)]
        for stream, seq in sent:
            frames, _ = pack(Frame(Header(stream, seq), np.zeros((2, 2, 3), np.uint8)))
            assert outbox.send(frames, block=True)
        time.sleep(0.2)  # the I/O thread moves them all to the inbox side
        first = inbox.recv(1.0)
        assert first is not None
        marked = with_queued(inbox, first, live={b"cam"}, limit=16)
        got = [(unpack(f, RingReaders()).message.header, overtaken) for f, overtaken in marked]
        assert [((h.stream_id, h.seq), o) for h, o in got] == [
            (("cam", 0), True), (("file", 0), False), (("cam", 1), True), (("file", 1), False), (("cam", 2), False)]
        # without live streams nothing is drained: one message at a time, as before
        assert with_queued(inbox, first, live=set(), limit=16) == [(first, False)]
    finally:
        inbox.close()
        outbox.socket.close(linger=0)
