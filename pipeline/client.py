"""Reading a maskstream publisher from Python: a SUB socket that yields decoded messages.

    from maskstream.pipeline.client import Subscriber, masks
    from maskstream.pipeline.runtime.messages import Detections

    with Subscriber("tcp://127.0.0.1:5556", streams=["cam0"]) as sub:
        for msg in sub:                                  # Detections, then EndOfStream at the end
            if isinstance(msg, Detections):
                full = masks(msg)                        # uint8 [N, H, W], one full-frame mask per instance
                print(msg.header.seq, msg.class_names, msg.scores, full.sum(axis=(1, 2)))
            print(sub.stats["cam0"].missed, "frames missed so far")

What arrives: `Detections` (boxes float32 [N, 4] xyxy in frame pixels, scores, labels,
class_names, masks as box-cropped COCO RLE) and `EndOfStream` (sequence ends, possibly with
an error). The wire format is docs/schema.md. With `streams` given, iteration stops once
every one of those streams has sent its EndOfStream; without, it runs until you break.

Drops are visible, never silent: a frame's `header.seq` counts every frame its source
produced, so a jump in seq is a frame that was dropped (by a live stage under load, or by
this socket's high-water mark). `sub.last_gap` is how many frames were missing just before
the last message returned; `sub.stats[stream]` keeps the totals.

`masks`, `mask`, `crop_rles`, `rles` and `to_json` work on any Detections, however it was
obtained; `to_json` is also the line format of `maskstream subscribe` and of JSONL outputs.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
import pycocotools.mask as mask_utils
import zmq
from maskstream.pipeline.runtime.messages import SCHEMA_VERSION, Detections, EndOfStream, Message, MessageError, decode

__all__ = [
    "SchemaVersionError",
    "SeqTracker",
    "StreamStats",
    "Subscriber",
    "crop_rles",
    "mask",
    "masks",
    "rles",
    "to_json",
]

Published = Detections | EndOfStream


class SchemaVersionError(MessageError):
    """The publisher speaks another wire-schema version than this client reads."""


# ---------------------------------------------------------------------------- masks


def crop_rles(det: Detections) -> list[dict[str, Any]]:
    """pycocotools RLE objects of the instances' crops (size [y1 - y0, x1 - x0] of crop_boxes[i])."""
    out = []
    for i, counts in enumerate(det.rle_counts):
        x0, y0, x1, y1 = (int(v) for v in det.crop_boxes[i])
        out.append({"size": [y1 - y0, x1 - x0], "counts": counts})
    return out


def mask(det: Detections, i: int) -> np.ndarray:
    """Full-frame uint8 0/1 mask [H, W] of instance i."""
    out = np.zeros(det.frame_hw, dtype=np.uint8)
    _paste_crop(det, i, out)
    return out


def masks(det: Detections) -> np.ndarray:
    """Full-frame uint8 0/1 masks [N, H, W] of all instances (N may be 0)."""
    out = np.zeros((len(det.rle_counts), *det.frame_hw), dtype=np.uint8)
    for i in range(len(det.rle_counts)):
        _paste_crop(det, i, out[i])
    return out


def _paste_crop(det: Detections, i: int, out: np.ndarray) -> None:
    # model.postprocess.decode_box_cropped_rle does the same, but importing it pulls in torch
    # (~2 s and hundreds of MB), which a downstream subscriber should not have to pay for.
    where = f"stream {det.header.stream_id!r} seq {det.header.seq} instance {i}"
    if not 0 <= i < len(det.rle_counts):
        raise IndexError(f"{where}: no such instance, the frame has {len(det.rle_counts)}")
    height, width = out.shape
    x0, y0, x1, y1 = (int(v) for v in det.crop_boxes[i])
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"{where}: crop box {(x0, y0, x1, y1)} does not fit in a {height}x{width} frame")
    if x1 == x0 or y1 == y0:  # the box lay wholly outside the frame: an empty mask
        return
    try:
        with warnings.catch_warnings():
            # pycocotools' array wrapper predates numpy 2's `copy` keyword; harmless noise
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            crop = mask_utils.decode({"size": [y1 - y0, x1 - x0], "counts": det.rle_counts[i]})
    except Exception as exc:  # pycocotools raises assorted types for corrupt counts
        raise ValueError(f"{where}: RLE counts do not decode ({type(exc).__name__}: {exc})") from None
    out[y0:y1, x0:x1] = crop


def rles(det: Detections) -> list[dict[str, Any]]:
    """Full-frame pycocotools RLE objects ({"size": [H, W], "counts": bytes}), as COCO results want.

    Built by decoding each crop, placing it in the frame and re-encoding: O(H*W) per
    instance, which is fine for writing results, not for a hot loop."""
    out: list[dict[str, Any]] = []
    for i in range(len(det.rle_counts)):
        rle = mask_utils.encode(np.asfortranarray(mask(det, i)))
        out.append({"size": list(rle["size"]), "counts": rle["counts"]})
    return out


# ---------------------------------------------------------------------------- sequence gaps


@dataclass(frozen=True)
class StreamStats:
    """What a reader has seen of one stream.

    missed: frames whose seq never arrived, summed over gaps (frames before the first one
    received are not counted: a reader that joins late has not missed them); gaps: how many
    jumps; restarts: how often seq went backwards (the stream began again)."""

    received: int = 0
    missed: int = 0
    gaps: int = 0
    restarts: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    ended: bool = False
    error: str = ""


class SeqTracker:
    """Per-stream seq bookkeeping, shared by the Subscriber and the JSONL writer."""

    def __init__(self) -> None:
        self.stats: dict[str, StreamStats] = {}

    def observe(self, message: Published) -> int:
        """Record one message; returns how many frames were missing just before it."""
        sid, seq = message.header.stream_id, message.header.seq
        ended = isinstance(message, EndOfStream)
        before = self.stats.get(sid)
        if before is None:
            gap, restarted, before = 0, 0, StreamStats(first_seq=seq)
        else:
            expected = 0 if before.last_seq is None else before.last_seq + 1
            restarted = int(before.ended or seq < expected)
            gap = 0 if restarted else seq - expected
        # An EndOfStream's seq is one past the last frame, so it also reveals dropped tail frames.
        last = seq - 1 if ended else seq
        self.stats[sid] = dataclasses.replace(
            before,
            received=before.received + 1,
            missed=before.missed + gap,
            gaps=before.gaps + (gap > 0),
            restarts=before.restarts + restarted,
            last_seq=last if last >= 0 else None,
            ended=ended,
            error=message.error if isinstance(message, EndOfStream) else "",
        )
        return gap


# ---------------------------------------------------------------------------- JSON


def to_json(message: Published, gap: int | None = None) -> dict[str, Any]:
    """A JSON-able dict of a Detections or EndOfStream message (the JSONL line format).

    Detections keep `maskstream segment`'s per-detection layout (box, label, class_name,
    score, mask: {crop_box, rle: {size, counts as str}}), so one reader reads both."""
    header = message.header
    line: dict[str, Any] = {
        "kind": type(message).__name__,
        "stream_id": header.stream_id,
        "seq": header.seq,
        "pts_s": header.pts_s,
        "stamps": [{"stage": s.stage, "start": s.start, "end": s.end} for s in header.stamps],
        "drops": {stage: n for stage, n in header.drops},
    }
    if gap is not None:
        line["gap"] = gap
    if isinstance(message, EndOfStream):
        line["error"] = message.error
        return line
    if not isinstance(message, Detections):
        raise ValueError(f"to_json: expected Detections or EndOfStream, got {type(message).__name__}")
    line["height"], line["width"] = (int(v) for v in message.frame_hw)
    line["detections"] = [
        {
            "box": [round(float(v), 2) for v in message.boxes[i]],
            "label": int(message.labels[i]),
            "class_name": message.class_names[i],
            "score": round(float(message.scores[i]), 4),
            "mask": {
                "crop_box": [int(v) for v in message.crop_boxes[i]],
                "rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            },
        }
        for i, rle in enumerate(crop_rles(message))
    ]
    return line


# ---------------------------------------------------------------------------- the socket


class Subscriber:
    """A ZeroMQ SUB socket connected to a maskstream publisher; iterate it for messages.

    endpoint: the publisher's address (e.g. tcp://127.0.0.1:5556); the publisher binds,
        subscribers connect, so a subscriber may start before or after the pipeline.
    streams: stream ids to receive (default: all). ZeroMQ filters topics by prefix, so
        "cam1" alone would also let "cam10" through; those are discarded here.
    timeout_s: how long one `recv` (and each step of iteration) waits before raising
        TimeoutError; None waits forever.
    high_water_mark: messages queued on this side before ZeroMQ drops new ones; drops
        show up as seq gaps like any other.

    Errors: SchemaVersionError when the publisher's schema version differs (nothing can be
    read until one side upgrades); MessageError for one malformed message (the next
    `recv`/iteration goes on with the following messages); TimeoutError after timeout_s.
    """

    def __init__(
        self,
        endpoint: str,
        streams: Sequence[str] | None = None,
        timeout_s: float | None = None,
        high_water_mark: int = 1000,
        context: zmq.Context | None = None,
    ) -> None:
        if isinstance(streams, (str, bytes)) or (streams is not None and not all(isinstance(s, str) for s in streams)):
            raise ValueError(f"streams: expected a list of stream ids (str) or None, got {streams!r}")
        if streams is not None and not streams:
            raise ValueError("streams: expected at least one stream id, or None for all streams")
        if timeout_s is not None and not (timeout_s >= 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s: expected a non-negative number of seconds or None, got {timeout_s!r}")
        self.endpoint = endpoint
        self.streams: tuple[str, ...] | None = tuple(streams) if streams is not None else None
        self.timeout_s = timeout_s
        self.last_gap = 0
        self._tracker = SeqTracker()
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.RCVHWM, high_water_mark)
            for topic in self.streams if self.streams is not None else ("",):
                self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ValueError(
                f"endpoint {endpoint!r}: cannot connect ({exc}); expected e.g. tcp://127.0.0.1:5556"
            ) from None

    @property
    def stats(self) -> dict[str, StreamStats]:
        """Per stream id: received, missed, gaps, restarts, first/last seq, ended."""
        return dict(self._tracker.stats)

    def recv(self, timeout_s: float | None = None) -> Published:
        """The next message of a subscribed stream; timeout_s None: the Subscriber's timeout_s."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if not self._socket.poll(wait_ms):
                raise TimeoutError(f"{self.endpoint}: no message in {timeout} s")
            frames = self._socket.recv_multipart()
            if self.streams is not None and frames[0].decode(errors="replace") not in self.streams:
                continue  # a longer topic that only shares a prefix with a subscribed one
            message = self._decode(frames)
            self.last_gap = self._tracker.observe(message)
            return message

    def __iter__(self) -> Iterator[Published]:
        return self

    def __next__(self) -> Published:
        if self._all_ended():
            raise StopIteration
        return self.recv()

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _all_ended(self) -> bool:
        stats = self._tracker.stats
        return self.streams is not None and all(sid in stats and stats[sid].ended for sid in self.streams)

    def _decode(self, frames: list[bytes]) -> Published:
        topic = frames[0].decode(errors="replace")
        try:
            message: Message = decode(frames)
        except MessageError as exc:
            version = _schema_version(frames)
            if version is not None and version != SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.endpoint}: the publisher sends schema version {version!r}, this client reads "
                    f"version {SCHEMA_VERSION}; install the maskstream release that matches the pipeline"
                ) from None
            raise MessageError(f"{self.endpoint}: stream {topic!r}: {exc}") from None
        if not isinstance(message, (Detections, EndOfStream)):
            raise MessageError(
                f"{self.endpoint}: stream {topic!r}: expected Detections or EndOfStream, got {type(message).__name__}"
            )
        return message


def _schema_version(frames: list[bytes]) -> Any:
    """The "v" of a header, or None when the header is not a readable msgpack map."""
    try:
        meta = msgpack.unpackb(frames[1], raw=False) if len(frames) > 1 else None
    except Exception:  # garbage: the caller reports the decode error instead
        return None
    return meta.get("v") if isinstance(meta, dict) else None
