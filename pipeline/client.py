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

Files written earlier read back as the same objects, with `read_jsonl`:

    from maskstream.pipeline.client import masks, read_jsonl

    for msg in read_jsonl("runs/run-1/results.jsonl"):    # maskstream run --out / subscribe --out / segment
        if isinstance(msg, Detections):
            print(msg.header.stream_id, msg.header.seq, masks(msg).shape)

Fleet mode's results (docs/fleet.md) are read the same way from a NATS URL, with replay:

    with Subscriber("nats://127.0.0.1:4222", streams=["cam*"], from_seq=1) as sub:   # ids or shell patterns
        for msg in sub:
            ...
        sub.last_stream_seq                              # resume later with from_seq=last_stream_seq + 1

(`pipeline.fleet.results.ResultSubscriber` underneath; `fleet_config` carries credentials and
TLS, its URLs replaced by the endpoint's, comma-separated for several servers.)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack
import numpy as np
import zmq
from maskstream.pipeline.results import (
    Published,
    SchemaVersionError,
    SeqTracker,
    StreamStats,
    crop_rles,
    mask,
    masks,
    rles,
    to_json,
)
from maskstream.pipeline.runtime.messages import (
    SCHEMA_VERSION,
    Detections,
    EndOfStream,
    Header,
    Message,
    MessageError,
    StageStamp,
    decode,
)
from maskstream.pipeline.runtime.transport import load_keypair

__all__ = [
    "SchemaVersionError",
    "SeqTracker",
    "StreamStats",
    "Subscriber",
    "crop_rles",
    "from_json",
    "mask",
    "masks",
    "read_jsonl",
    "rles",
    "to_json",
]


# ---------------------------------------------------------------------------- the socket

# A Detections' largest part is its RLE strings of box-cropped masks: far below this at any frame size.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


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
    server_key, client_key: for a publisher that uses CurveZMQ (`maskstream run --publish-key`):
        the publisher's public key file (NAME.key) and this subscriber's secret key file
        (NAME.key_secret, zmq.auth's format), whose public key must be among the publisher's
        authorised ones. Without them nothing from such a publisher arrives (TimeoutError),
        and the same with a key the publisher does not know: CurveZMQ refuses, silently.
    max_message_bytes: the largest ZeroMQ message part accepted (ZMQ_MAXMSGSIZE; None: no limit),
        so that a rogue or broken peer cannot make this process buffer whatever it sends. The
        default holds any real Detections many times over. ZeroMQ drops the connection that sends
        a larger part (a protocol error, after which it would never connect again by itself);
        this subscriber then connects again: the frames published meanwhile show as seq gaps.
        ZeroMQ only (on NATS the server's max_payload bounds messages).

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
        server_key: str | Path | None = None,
        client_key: str | Path | None = None,
        from_seq: int | None = None,
        fleet_config: Any = None,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if isinstance(streams, (str, bytes)) or (streams is not None and not all(isinstance(s, str) for s in streams)):
            raise ValueError(f"streams: expected a list of stream ids (str) or None, got {streams!r}")
        if streams is not None and not streams:
            raise ValueError("streams: expected at least one stream id, or None for all streams")
        if timeout_s is not None and not (timeout_s >= 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s: expected a non-negative number of seconds or None, got {timeout_s!r}")
        limit = max_message_bytes
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"max_message_bytes: expected a positive number of bytes or None, got {limit!r}")
        if (server_key is None) != (client_key is None):
            raise ValueError("server_key and client_key go together: the publisher's public key file and this "
                             "subscriber's secret key file (CurveZMQ)")
        curve = None
        if server_key is not None and client_key is not None:
            server_public, _ = load_keypair(Path(server_key), secret=False)
            public, secret = load_keypair(Path(client_key), secret=True)
            curve = (server_public, public, secret)
        self.endpoint = endpoint
        self.streams: tuple[str, ...] | None = tuple(streams) if streams is not None else None
        self.timeout_s = timeout_s
        self.last_gap = 0
        self._tracker = SeqTracker()
        self._nats: Any = None
        if is_nats_url(endpoint):
            if curve is not None:
                raise ValueError("server_key and client_key are CurveZMQ's; on NATS, fleet_config holds the "
                                 "credentials and TLS")
            self._nats = _nats_subscriber(endpoint, streams, from_seq, timeout_s, fleet_config)
            return
        if from_seq is not None:
            raise ValueError("from_seq: only results on NATS (nats://...) can be replayed from a sequence number")
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.RCVHWM, high_water_mark)
            self._socket.setsockopt(zmq.MAXMSGSIZE, -1 if max_message_bytes is None else max_message_bytes)
            if curve is not None:
                self._socket.curve_serverkey, self._socket.curve_publickey, self._socket.curve_secretkey = curve
            for topic in self.streams if self.streams is not None else ("",):
                self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
            self._socket.connect(endpoint)
            # Told of every dropped connection, so that one dropped for good (an oversized part) is made again.
            self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._poller = zmq.Poller()
            self._poller.register(self._socket, zmq.POLLIN)
            self._poller.register(self._monitor, zmq.POLLIN)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ValueError(
                f"endpoint {endpoint!r}: cannot connect ({exc}); expected e.g. tcp://127.0.0.1:5556"
            ) from None

    @property
    def stats(self) -> dict[str, StreamStats]:
        """Per stream id: received, missed, gaps, restarts, first/last seq, ended."""
        if self._nats is not None:
            return dict(self._nats.stats)
        return dict(self._tracker.stats)

    @property
    def last_stream_seq(self) -> int:
        """NATS only: the results stream's sequence number of the last message read (resume after it)."""
        if self._nats is None:
            raise AttributeError("last_stream_seq: only results read from NATS have stream sequence numbers")
        return int(self._nats.last_stream_seq)

    def recv(self, timeout_s: float | None = None) -> Published:
        """The next message of a subscribed stream; timeout_s None: the Subscriber's timeout_s."""
        if self._nats is not None:
            message: Published = self._nats.recv(timeout_s)
            self.last_gap = self._nats.last_gap
            return message
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(self._poller.poll(wait_ms))
            if self._socket not in ready:
                if self._monitor not in ready:
                    raise TimeoutError(f"{self.endpoint}: no message in {timeout} s")
                self._reconnect()
                continue
            frames = self._socket.recv_multipart()
            if self.streams is not None and frames[0].decode(errors="replace") not in self.streams:
                continue  # a longer topic that only shares a prefix with a subscribed one
            message = self._decode(frames)
            self.last_gap = self._tracker.observe(message)
            return message

    def __iter__(self) -> Iterator[Published]:
        return self

    def __next__(self) -> Published:
        if self._nats is not None:
            message: Published = next(self._nats)
            self.last_gap = self._nats.last_gap
            return message
        if self._all_ended():
            raise StopIteration
        return self.recv()

    def close(self) -> None:
        if self._nats is not None:
            self._nats.close()
            return
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close()

    def _reconnect(self) -> None:
        """After a dropped connection, once every message it delivered has been read: connect
        afresh. ZeroMQ reconnects by itself after a network error but never after a protocol
        error (a part over max_message_bytes); a fresh connection serves both."""
        while self._monitor.poll(0):
            self._monitor.recv_multipart()  # the events: each says "disconnected", none needs reading
        try:
            self._socket.disconnect(self.endpoint)
        except zmq.ZMQError:  # the connection has gone entirely already
            pass
        self._socket.connect(self.endpoint)

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


def is_nats_url(endpoint: str) -> bool:
    return endpoint.split("://", 1)[0] in ("nats", "tls")


def _nats_subscriber(endpoint: str, streams: Sequence[str] | None, from_seq: int | None, timeout_s: float | None,
                     fleet_config: Any) -> Any:
    """A ResultSubscriber on the servers of `endpoint` (comma-separated); imported here, so that a
    ZeroMQ reader never loads the NATS client."""
    import dataclasses

    from maskstream.pipeline.fleet.config import FleetConfig
    from maskstream.pipeline.fleet.results import ResultSubscriber

    config = fleet_config if fleet_config is not None else FleetConfig()
    urls = tuple(url.strip() for url in endpoint.split(",") if url.strip())
    config = dataclasses.replace(config, nats=dataclasses.replace(config.nats, urls=urls))
    return ResultSubscriber.connect(config, streams, from_seq, timeout_s)


def _schema_version(frames: list[bytes]) -> Any:
    """The "v" of a header, or None when the header is not a readable msgpack map."""
    try:
        meta = msgpack.unpackb(frames[1], raw=False) if len(frames) > 1 else None
    except Exception:  # garbage: the caller reports the decode error instead
        return None
    return meta.get("v") if isinstance(meta, dict) else None


# ---------------------------------------------------------------------------- files


def read_jsonl(path: str | Path, streams: Sequence[str] | None = None) -> Iterator[Published]:
    """The messages of a JSONL file, in file order, as the Subscriber yields them: the lines of
    `maskstream run --out`, `maskstream subscribe --out` (Detections, then an EndOfStream per
    stream) or `maskstream segment` (one Detections per image: stream id the image's file stem,
    seq its line number from 0). streams: keep only these stream ids.

    Numbers come back as the file has them (boxes to 0.01 px, scores to 1e-4). A line that is
    not such a record raises ValueError naming the file and line (a run that crashed may have
    cut its very last line short)."""
    path = Path(path)
    wanted = None if streams is None else set(streams)
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                message = from_json(json.loads(line), default_seq=number - 1)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise ValueError(f"{path}: line {number}: not a maskstream record ({type(exc).__name__}: {exc})") \
                    from None
            if wanted is None or message.header.stream_id in wanted:
                yield message


def from_json(record: dict[str, Any], default_seq: int = 0) -> Published:
    """The Detections or EndOfStream a `to_json` (or `maskstream segment`) record describes;
    default_seq numbers a segment record, which has no seq of its own."""
    if "kind" not in record:  # maskstream segment: one image, a one-frame stream named after it
        header = Header(Path(record["image"]).stem, default_seq)
    else:
        header = Header(
            str(record["stream_id"]), int(record["seq"]),
            None if record.get("pts_s") is None else float(record["pts_s"]),
            tuple(StageStamp(str(s["stage"]), float(s["start"]), float(s["end"])) for s in record.get("stamps", ())),
            tuple((str(stage), int(n)) for stage, n in record.get("drops", {}).items()),
        )
        if record["kind"] == "EndOfStream":
            return EndOfStream(header, str(record.get("error", "")))
        if record["kind"] != "Detections":
            raise ValueError(f"kind {record['kind']!r}: expected Detections or EndOfStream")
    found = record["detections"]
    n = len(found)
    return Detections(
        header,
        (int(record["height"]), int(record["width"])),
        np.array([d["box"] for d in found], dtype=np.float32).reshape(n, 4),
        np.array([d["score"] for d in found], dtype=np.float32).reshape(n),
        np.array([d["label"] for d in found], dtype=np.int32).reshape(n),
        tuple(str(d["class_name"]) for d in found),
        np.array([d["mask"]["crop_box"] for d in found], dtype=np.int32).reshape(n, 4),
        tuple(str(d["mask"]["rle"]["counts"]).encode("ascii") for d in found),
    )
