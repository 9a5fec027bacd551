"""Internal wire: inline buffers and shared-memory slots give the same message; garbage is a clear error."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from maskstream.pipeline.runtime.messages import (
    Frame,
    Header,
    MessageError,
    StageReport,
    StreamProgress,
    decode_report,
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
