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

`masks`, `mask`, `crop_rles`, `rles`, `to_json` and `SeqTracker` are `pipeline.results`'s,
re-exported here: they work on any Detections, however it was obtained; `to_json` is also the
line format of `maskstream subscribe` and of JSONL outputs. Neither module imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import msgpack
import zmq
from maskstream.pipeline.results import (
    Published,
    SeqTracker,
    StreamStats,
    crop_rles,
    mask,
    masks,
    rles,
    to_json,
)
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


class SchemaVersionError(MessageError):
    """The publisher speaks another wire-schema version than this client reads."""


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
