"""The subscriber client and `maskstream subscribe` against a real PUB socket.

The publisher is an XPUB socket (a PUB that also hands over subscriptions), so a test sends
only once the subscriber's subscription has arrived: ZeroMQ drops what a PUB sends before
that, and waiting for it beats sleeping and hoping."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import zmq
from maskstream.model.rle import decode_box_cropped_rle
from maskstream.pipeline.client import SchemaVersionError, SeqTracker, Subscriber, crop_rles, mask, masks, rles, to_json
from maskstream.pipeline.runtime.messages import (
    SCHEMA_VERSION,
    Detections,
    EndOfStream,
    Header,
    MessageError,
    StageStamp,
    encode,
)

from tests.make_detections import FRAME_HW, end_of_stream, make_detections

REPO = Path(__file__).resolve().parents[1]


class Publisher:
    def __init__(self) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 1000)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def wait_for_subscribers(self, topics: set[str], timeout_s: float = 30.0) -> None:
        """Return once every topic has a subscription (b"\\x01" + topic)."""
        waiting = set(topics)
        deadline = time.monotonic() + timeout_s
        while waiting:
            assert self.socket.poll(int(max(0.0, deadline - time.monotonic()) * 1000)), f"no subscription to {waiting}"
            event = self.socket.recv()
            if event[:1] == b"\x01":
                waiting.discard(event[1:].decode())

    def send(self, *messages) -> None:
        for message in messages:
            self.socket.send_multipart(message if isinstance(message, list) else encode(message))

    def close(self) -> None:
        self.socket.close()
        self.context.term()


@pytest.fixture
def publisher():
    pub = Publisher()
    yield pub
    pub.close()


def test_subscriber_yields_decoded_detections_until_the_end_of_stream(publisher):
    sent = [make_detections("cam0", seq) for seq in range(3)]
    with Subscriber(publisher.endpoint, streams=["cam0"], timeout_s=10) as sub:
        publisher.wait_for_subscribers({"cam0"})
        publisher.send(*(det for det, _ in sent), end_of_stream("cam0", 3))
        received = list(sub)  # stops by itself: cam0 has ended
        stats = sub.stats["cam0"]

    assert [type(m) for m in received] == [Detections] * 3 + [EndOfStream]
    for (det, full), got in zip(sent, received):
        assert got.header == det.header and got.frame_hw == FRAME_HW and got.class_names == det.class_names
        np.testing.assert_array_equal(got.boxes, det.boxes)
        np.testing.assert_array_equal(got.crop_boxes, det.crop_boxes)
        np.testing.assert_array_equal(masks(got), full)  # the round trip the user cares about
        np.testing.assert_array_equal(mask(got, 1), full[1])
    assert stats.received == 4 and stats.missed == 0 and stats.ended and stats.last_seq == 2


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_mask_helpers_agree_with_the_postprocess_and_pycocotools():
    det, full = make_detections("cam0", 7)
    for i, rle in enumerate(crop_rles(det)):
        np.testing.assert_array_equal(decode_box_cropped_rle(rle, det.crop_boxes[i], det.frame_hw), full[i])
    for i, rle in enumerate(rles(det)):
        assert rle["size"] == list(FRAME_HW)
        np.testing.assert_array_equal(mask_utils.decode(rle), full[i])
        assert mask_utils.area(rle) == full[i].sum()
    with pytest.raises(IndexError, match="stream 'cam0' seq 7 instance 2: no such instance"):
        mask(det, 2)


def test_topic_filter_is_exact_not_a_prefix(publisher):
    with Subscriber(publisher.endpoint, streams=["cam1"], timeout_s=10) as sub:
        publisher.wait_for_subscribers({"cam1"})
        publisher.send(
            make_detections("cam10", 0)[0], make_detections("cam1", 0)[0], make_detections("cam2", 0)[0],
            end_of_stream("cam10", 1), end_of_stream("cam1", 1),
        )
        received = list(sub)
    kinds = [(type(m).__name__, m.header.stream_id) for m in received]
    assert kinds == [("Detections", "cam1"), ("EndOfStream", "cam1")]


def test_sequence_gaps_are_counted_per_stream(publisher):
    with Subscriber(publisher.endpoint, timeout_s=10) as sub:  # all streams
        publisher.wait_for_subscribers({""})
        seqs = [0, 1, 3, 6]
        publisher.send(*(make_detections("a", s)[0] for s in seqs), make_detections("b", 0)[0])
        publisher.send(end_of_stream("a", 8))  # frame 7 never came either
        gaps = []
        for _ in range(len(seqs) + 2):
            message = sub.recv()
            gaps.append((message.header.stream_id, message.header.seq, sub.last_gap))
        stats = sub.stats
    assert gaps == [("a", 0, 0), ("a", 1, 0), ("a", 3, 1), ("a", 6, 2), ("b", 0, 0), ("a", 8, 1)]
    assert (stats["a"].missed, stats["a"].gaps, stats["a"].ended) == (4, 3, True)
    assert (stats["b"].missed, stats["b"].ended) == (0, False)


def test_seq_tracker_treats_a_backwards_seq_as_a_restart():
    tracker = SeqTracker()
    gaps = [tracker.observe(m) for m in (make_detections("s", 5)[0], end_of_stream("s", 6), make_detections("s", 0)[0])]
    stats = tracker.stats["s"]
    assert gaps == [0, 0, 0]  # frames 0-4 were before this reader joined: not counted as missed
    assert (stats.first_seq, stats.last_seq, stats.restarts, stats.ended) == (5, 0, 1, False)


def test_schema_version_mismatch_is_a_clear_error_and_a_bad_message_is_skippable(publisher):
    det = make_detections("cam0", 0)[0]
    topic, header, *buffers = encode(det)
    meta = msgpack.unpackb(header)
    future = [topic, msgpack.packb({**meta, "v": SCHEMA_VERSION + 1}), *buffers]
    with Subscriber(publisher.endpoint, streams=["cam0"], timeout_s=10) as sub:
        publisher.wait_for_subscribers({"cam0"})
        publisher.send(future, [b"cam0", b"\xc1garbage"], det)
        with pytest.raises(SchemaVersionError, match=rf"schema version {SCHEMA_VERSION + 1}, this client reads version "
                                                     rf"{SCHEMA_VERSION}"):
            sub.recv()
        with pytest.raises(MessageError, match=r"stream 'cam0': header is not valid msgpack"):
            sub.recv()
        assert sub.recv().header.seq == 0  # the stream goes on after a bad message


def test_a_message_part_over_max_message_bytes_is_refused_and_the_stream_goes_on(publisher):
    """ZMQ_MAXMSGSIZE on the SUB socket: the oversized part never reaches this process's memory
    (ZeroMQ drops the connection that sent it, for good); the subscriber connects again and later
    messages arrive, the frames lost meanwhile counted as missed."""
    with Subscriber(publisher.endpoint, streams=["cam0"], timeout_s=10, max_message_bytes=1 << 20) as sub:
        publisher.wait_for_subscribers({"cam0"})
        publisher.send([b"cam0", b"\x00" * (2 << 20)], make_detections("cam0", 0)[0])
        with pytest.raises(TimeoutError):  # the connection was dropped at the big part: seq 0 is lost with it
            sub.recv(timeout_s=2)
        # The new connection's subscription reaches the PUB when it does: send until one arrives.
        received, seq, deadline = None, 1, time.monotonic() + 20
        while received is None and time.monotonic() < deadline:
            publisher.send(make_detections("cam0", seq)[0])
            try:
                received = sub.recv(timeout_s=0.5)
            except TimeoutError:
                seq += 1
        assert isinstance(received, Detections) and received.header.seq >= 1
        assert sub.stats["cam0"].first_seq == received.header.seq and sub.stats["cam0"].received == 1
    with pytest.raises(ValueError, match="max_message_bytes: expected a positive number of bytes or None"):
        Subscriber(publisher.endpoint, max_message_bytes=0)


def test_timeout_and_bad_arguments(publisher):
    with Subscriber(publisher.endpoint, timeout_s=0.2) as sub:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no message in 0.2 s"):
            sub.recv()
        assert time.monotonic() - started < 2
    with pytest.raises(ValueError, match="streams: expected a list of stream ids"):
        Subscriber(publisher.endpoint, streams="cam0")
    with pytest.raises(ValueError, match="endpoint 'nonsense': cannot connect"):
        Subscriber("nonsense")


def test_to_json_keeps_the_segment_layout():
    det, full = make_detections("cam0", 4)
    line = json.loads(json.dumps(to_json(det, gap=2)))
    assert (line["kind"], line["stream_id"], line["seq"], line["gap"]) == ("Detections", "cam0", 4, 2)
    assert (line["height"], line["width"], line["pts_s"]) == (*FRAME_HW, 0.4)
    assert line["stamps"] == [{"stage": "decode", "start": 5.0, "end": 1.001 + 4}] and line["drops"] == {"decode": 0}
    first = line["detections"][0]
    assert set(first) == {"box", "label", "class_name", "score", "mask"}  # as in `maskstream segment`
    assert (first["label"], first["class_name"], first["score"]) == (1, "square", 0.9)
    np.testing.assert_array_equal(
        decode_box_cropped_rle(first["mask"]["rle"], first["mask"]["crop_box"], FRAME_HW), full[0]
    )
    eos = to_json(end_of_stream("cam0", 5, error="corrupt packet"))
    assert (eos["kind"], eos["seq"], eos["error"]) == ("EndOfStream", 5, "corrupt packet")


# ---------------------------------------------------------------------------- the CLI


def run_subscribe(*args: str) -> subprocess.Popen:
    """`maskstream subscribe` as a terminal starts it: SIGINT at its default whatever this process has
    (a shell that runs the tests in the background ignores SIGINT, its children inherit that, and a
    Python started so never turns Ctrl-C into KeyboardInterrupt)."""
    return subprocess.Popen(
        [sys.executable, "-m", "maskstream.pipeline.cli", "subscribe", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_cli_prints_one_json_line_per_message_and_exits_at_the_end(publisher):
    process = run_subscribe(publisher.endpoint, "--stream", "cam0", "--timeout", "60")
    try:
        publisher.wait_for_subscribers({"cam0"})
        publisher.send(make_detections("cam0", 0)[0], make_detections("cam9", 0)[0], make_detections("cam0", 2)[0])
        publisher.send(end_of_stream("cam0", 3))
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(ln["kind"], ln["seq"], ln["gap"]) for ln in lines] == [
        ("Detections", 0, 0), ("Detections", 2, 1), ("EndOfStream", 3, 0)
    ]
    assert len(lines[0]["detections"]) == 2
    assert "cam0: 3 messages, 1 frames missed in 1 gaps, ended" in err


def test_cli_writes_jsonl_and_stops_after_count(publisher, tmp_path):
    out_file = tmp_path / "sub" / "results.jsonl"
    process = run_subscribe(publisher.endpoint, "--out", str(out_file), "--count", "2", "--timeout", "60")
    try:
        publisher.wait_for_subscribers({""})
        publisher.send(*(make_detections("cam0", s)[0] for s in range(3)))
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out == ""
    assert [json.loads(line)["seq"] for line in out_file.read_text().splitlines()] == [0, 1]


def test_cli_ctrl_c_exits_cleanly_with_a_summary(publisher):
    process = run_subscribe(publisher.endpoint)
    try:
        publisher.wait_for_subscribers({""})
        publisher.send(make_detections("cam0", 0)[0])
        assert json.loads(process.stdout.readline())["seq"] == 0  # it is receiving, now interrupt it
        os.kill(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err and "cam0: 1 messages, 0 frames missed in 0 gaps, open" in err


def test_schema_doc_documents_every_published_field_and_the_version():
    """docs/schema.md is what non-Python subscribers code against: it must not fall behind messages.py."""
    doc = (REPO / "docs" / "schema.md").read_text()
    for cls in (Header, Detections, EndOfStream, StageStamp):
        for field in dataclasses.fields(cls):
            # a table row `name`, or inside {a: type, b: type}
            spelled = (f"`{field.name}`", f"{{{field.name}: ", f" {field.name}: ")
            assert any(s in doc for s in spelled), f"docs/schema.md: {cls.__name__}.{field.name} is not documented"
    assert f"schema version **{SCHEMA_VERSION}**" in doc and f"| {SCHEMA_VERSION} |" in doc
