"""Results on NATS: every Detections / EndOfStream on a subject per stream, kept in a JetStream stream.

Subjects: `<prefix>.<token>` (prefix `maskstream.results` by default), token = `stream_token(stream
id)`. A subject token cannot hold `.`, `*`, `>` or white space, and stream ids are file stems
(`clip.v2`) or camera names, so the token keeps ASCII letters, digits, `_` and `-` and writes every
other UTF-8 byte as `=XX` (two upper-case hex digits; `=` itself too). The mapping is one-to-one and
reversible (`stream_from_token`), and the token is also a valid KV key.

Payload: the message's ZeroMQ frames ([topic, msgpack header, raw buffers...] of
`messages.encode`) in one NATS message, length-prefixed (docs/schema.md, "Results on NATS"):

    u32 n | u32 len(frame 0) ... u32 len(frame n-1) | frame 0 | ... | frame n-1     (little-endian)

so the bytes of every array go through unchanged and `messages.decode` reads them as from a
socket. No pickle anywhere; a malformed payload raises MessageError.

Exactly once per (stream, seq): each publish carries `Nats-Msg-Id: <token>:<seq>` (or
`<token>:<epoch>:<seq>` with an epoch), and the server stores a message id only once within the
stream's duplicate window, so a re-run job's repeated results are stored once. A live camera that
moves to another node starts its seq again; its publisher passes an epoch (e.g. the lease
revision) so that its new frames are not mistaken for the old ones. For re-runs that start after
the duplicate window, `ResultPublisher.last_seq` tells where the stored results of a stream end.
A job's writer also passes `after`, the stream sequence of the last result of its stream that it
knows stored: the server stores the message only if that is still the stream's last
(Nats-Expected-Last-Subject-Sequence), so an attempt that another attempt replaced (its node cut
off past ack_wait_s, its publishes held in the network and delivered late) cannot store a frame
again after the duplicate window, nor out of order. The server checks that header before the
message id, so a refusal whose stored last message carries this very message id is this
publisher's own earlier try: stored, a duplicate. Any other refusal is `Superseded`.

Reading back: `ResultSubscriber` reads the stream through an ephemeral pull consumer from a
stream sequence number (`from_seq`), filtered to some streams (exact ids, or shell patterns such
as `cam*`), and yields the Detections / EndOfStream objects that `pipeline.client.Subscriber`
yields. It keeps the last stream sequence it returned, checks the consumer's delivery sequence
for jumps, and recreates its consumer from the next sequence after a jump or when its consumer
vanished (its server died): no gap, no duplicate. `last_stream_seq + 1` resumes a later reader.
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import re
import struct
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgpack
import nats.errors
import nats.js.errors
from maskstream.pipeline.fleet.config import FleetConfig, ResultsConfig
from maskstream.pipeline.fleet.connection import UNAVAILABLE, FleetClient, FleetError, FleetUnavailable, retrying
from maskstream.pipeline.results import SchemaVersionError, SeqTracker, StreamStats
from maskstream.pipeline.runtime.messages import (
    SCHEMA_VERSION,
    Detections,
    EndOfStream,
    Header,
    Message,
    MessageError,
    decode,
    encode,
)
from nats.aio.msg import Msg
from nats.js import api

__all__ = [
    "Published",
    "ResultPublisher",
    "ResultSubscriber",
    "Stored",
    "Superseded",
    "decode_result",
    "encode_result",
    "ensure_results_stream",
    "message_id",
    "pack_frames",
    "stream_from_token",
    "stream_token",
    "subject_of",
    "unpack_frames",
]

Published = Detections | EndOfStream

_SAFE = re.compile(r"[A-Za-z0-9_-]")
_TOKEN = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+")
_U32 = struct.Struct("<I")
_MAX_FRAMES = 64  # a published message has a topic, a header and a handful of arrays


# ---------------------------------------------------------------------------- names


def stream_token(stream_id: str) -> str:
    """The subject token of a stream id (see the module docstring)."""
    if not isinstance(stream_id, str) or not stream_id:
        raise ValueError(f"stream id: expected a non-empty str, got {stream_id!r}")
    return "".join(ch if _SAFE.fullmatch(ch) else "".join(f"={b:02X}" for b in ch.encode()) for ch in stream_id)


def stream_from_token(token: str) -> str:
    """The stream id of a token that `stream_token` wrote; ValueError for any other text."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{token!r} is not a stream token")
    raw, i = bytearray(), 0
    while i < len(token):
        if token[i] == "=":
            raw.append(int(token[i + 1:i + 3], 16))
            i += 3
        else:
            raw += token[i].encode()
            i += 1
    try:
        stream_id = raw.decode("utf-8")
    except UnicodeError:
        raise ValueError(f"{token!r} does not decode to UTF-8") from None
    if stream_token(stream_id) != token:  # e.g. "=41" for "A": one id, one token
        raise ValueError(f"{token!r} is not the canonical token of {stream_id!r}")
    return stream_id


def subject_of(prefix: str, stream_id: str) -> str:
    return f"{prefix}.{stream_token(stream_id)}"


def message_id(stream_id: str, seq: int, epoch: str = "") -> str:
    """The Nats-Msg-Id of one result: `<token>:<seq>`, or `<token>:<epoch>:<seq>`."""
    if epoch and not _TOKEN.fullmatch(epoch):
        raise ValueError(f"epoch: {epoch!r} must be letters, digits, '_' or '-'")
    return f"{stream_token(stream_id)}:{epoch}:{seq}" if epoch else f"{stream_token(stream_id)}:{seq}"


# ---------------------------------------------------------------------------- payload


def pack_frames(frames: Sequence[bytes | memoryview]) -> bytes:
    """One payload of ZeroMQ frames: u32 count, u32 length of each, then the frames (little-endian)."""
    views = [memoryview(f).cast("B") for f in frames]
    if not 2 <= len(views) <= _MAX_FRAMES:
        raise ValueError(f"expected 2 to {_MAX_FRAMES} frames, got {len(views)}")
    head = struct.pack(f"<{1 + len(views)}I", len(views), *(v.nbytes for v in views))
    return b"".join([head, *views])


def unpack_frames(payload: bytes | memoryview) -> list[memoryview]:
    """The frames of `pack_frames` as zero-copy views; MessageError for anything else."""
    data = memoryview(payload).cast("B")
    if data.nbytes < _U32.size:
        raise MessageError(f"payload of {data.nbytes} bytes: too short for a frame count")
    (count,) = _U32.unpack_from(data, 0)
    if not 2 <= count <= _MAX_FRAMES:
        raise MessageError(f"payload: {count} frames, expected 2 to {_MAX_FRAMES}")
    start = _U32.size * (1 + count)
    if data.nbytes < start:
        raise MessageError(f"payload of {data.nbytes} bytes: too short for {count} frame lengths")
    lengths = struct.unpack_from(f"<{count}I", data, _U32.size)
    if start + sum(lengths) != data.nbytes:
        raise MessageError(f"payload: frames of {sum(lengths)} bytes declared, {data.nbytes - start} present")
    frames = []
    for length in lengths:
        frames.append(data[start:start + length])
        start += length
    return frames


def encode_result(message: Published) -> bytes:
    if not isinstance(message, (Detections, EndOfStream)):
        raise ValueError(f"only Detections and EndOfStream are published, got {type(message).__name__}")
    return pack_frames(encode(message))


def decode_result(payload: bytes | memoryview, where: str = "result") -> Published:
    """The message of one payload; SchemaVersionError / MessageError say what is wrong."""
    frames = unpack_frames(payload)
    try:
        message: Message = decode(frames)
    except MessageError as exc:
        version = _schema_version(frames[1])
        if version is not None and version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where}: written with schema version {version!r}, this client reads version {SCHEMA_VERSION}; "
                f"install the maskstream release that matches the pipeline"
            ) from None
        raise MessageError(f"{where}: {exc}") from None
    if not isinstance(message, (Detections, EndOfStream)):
        raise MessageError(f"{where}: expected Detections or EndOfStream, got {type(message).__name__}")
    return message


def _schema_version(header: memoryview) -> Any:
    try:
        meta = msgpack.unpackb(header, raw=False)
    except Exception:  # garbage: the caller reports the decode error instead
        return None
    return meta.get("v") if isinstance(meta, dict) else None


# ---------------------------------------------------------------------------- the stream


def results_stream_config(config: FleetConfig) -> api.StreamConfig:
    res = config.results
    return api.StreamConfig(
        name=res.stream, subjects=[f"{res.subject_prefix}.*"], retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD, storage=api.StorageType.FILE, num_replicas=config.replicas,
        max_age=res.max_age_s, max_bytes=res.max_bytes, duplicate_window=res.duplicate_window_s,
        allow_direct=True,
    )


def ensure_results_stream(client: FleetClient) -> None:
    """Create the results stream, or bring its limits to the config's."""
    client.run(client.ensure_stream(results_stream_config(client.config)))


# JSStreamWrongLastSequenceErr: the subject's last message is not the one the publish expected.
_WRONG_LAST_SEQUENCE = 10071


class Superseded(FleetError):
    """Another writer stored a result of this stream since the one the publish expected: its results
    are that writer's to store now."""


@dataclass(frozen=True)
class Stored:
    """Where the server put one published result."""

    stream_seq: int  # the results stream's sequence number (what from_seq counts)
    duplicate: bool  # already stored under the same message id: this publish changed nothing


class ResultPublisher:
    """Publishes results and waits until the cluster has stored each (its PubAck), retrying through
    leader elections and reconnects for up to results.publish_timeout_s; the message id makes
    those retries safe."""

    def __init__(self, client: FleetClient) -> None:
        self.client = client
        self.config: ResultsConfig = client.config.results

    def publish(self, message: Published, epoch: str = "", after: int | None = None) -> Stored:
        """Store one result. after: the stream sequence of the stream's last stored result (0: none) that
        this writer knows of; Superseded when another writer stored one since (see the module docstring)."""
        payload = encode_result(message)
        sid, seq = message.header.stream_id, message.header.seq
        subject = subject_of(self.config.subject_prefix, sid)
        return self.client.run(self._publish(subject, payload, message_id(sid, seq, epoch), after))

    def end_after_last(self, stream_id: str, error: str, epoch: str = "", tries: int = 5) -> Stored | None:
        """End a stream that its writer will not end (a job cancelled): an EndOfStream saying `error`
        after its last stored result, stored only if nothing was stored since that read (`after`).
        None when the stream has ended already."""
        for _ in range(tries):
            stored = self.last_stored(stream_id)
            if stored is not None and isinstance(stored[1], EndOfStream):
                return None
            header = stored[1].header if stored is not None else None
            end = EndOfStream(Header(stream_id, header.seq + 1 if header else 0, None, (),
                                     header.drops if header else ()), error)
            try:
                return self.publish(end, epoch=epoch, after=stored[0] if stored is not None else 0)
            except Superseded:
                continue  # a writer stored one meanwhile: end after it
        raise FleetError(f"stream {stream_id}: results stored under us {tries} times in a row; not ended")

    def last_seq(self, stream_id: str) -> int | None:
        """The header seq of the last stored result of `stream_id` (an EndOfStream counts), or None."""
        last = self.last_result(stream_id)
        return None if last is None else last.header.seq

    def last_result(self, stream_id: str) -> Published | None:
        """The last stored result of `stream_id` (a job whose last result is its EndOfStream is complete), or None."""
        last = self.last_stored(stream_id)
        return None if last is None else last[1]

    def last_stored(self, stream_id: str) -> tuple[int, Published] | None:
        """The last stored result of `stream_id` with its stream sequence (what `publish(after=)` takes), or None."""
        subject = subject_of(self.config.subject_prefix, stream_id)
        last = self.client.run(self._last_msg(subject))
        if last is None or last.data is None or last.seq is None:
            return None
        return last.seq, decode_result(last.data, where=f"{subject} seq {last.seq}")

    async def _publish(self, subject: str, payload: bytes, msg_id: str, after: int | None) -> Stored:
        headers = {"Nats-Msg-Id": msg_id}
        if after is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(after)
        try:
            ack = await retrying(
                lambda: self.client.js.publish(subject, payload, headers=headers, stream=self.config.stream),
                self.config.publish_timeout_s, f"{subject}: result {msg_id} not stored")
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _WRONG_LAST_SEQUENCE:
                raise
            last = await self._last_msg(subject)
            if last is not None and last.seq is not None and (last.headers or {}).get("Nats-Msg-Id") == msg_id:
                return Stored(last.seq, True)  # an earlier try of this very publish was stored
            raise Superseded(f"{subject}: result {msg_id} not stored: another writer stored "
                             f"seq {None if last is None else last.seq} after {after}") from None
        return Stored(ack.seq, bool(ack.duplicate))

    async def _last_msg(self, subject: str) -> Any:
        try:
            return await self.client.js.get_msg(self.config.stream, subject=subject, direct=True)
        except nats.js.errors.NotFoundError:
            return None


# ---------------------------------------------------------------------------- reading back


class ResultSubscriber:
    """Results from the results stream, in stream order; iterate it like `pipeline.client.Subscriber`.

    Make one with `ResultSubscriber.open(client, ...)` (it shares the caller's connection) or
    `ResultSubscriber.connect(config, ...)` (its own connection, closed with it).

    streams: stream ids (exact) or shell patterns (`cam*`); None: all streams. With exact ids only,
        iteration stops once each has sent its EndOfStream, as the ZeroMQ Subscriber's does.
    from_seq: the results stream's sequence number to start at (1: everything still kept);
        None: only results stored from now on. `last_stream_seq + 1` resumes where a reader stopped.
    timeout_s: how long one `recv` waits before TimeoutError; None waits forever.

    Also as the ZeroMQ Subscriber: `last_gap` (frames missing before the last message by seq),
    `stats` per stream; MessageError for one malformed message (the next recv goes on).
    """

    def __init__(self, client: FleetClient, streams: Sequence[str] | None = None, from_seq: int | None = None,
                 timeout_s: float | None = None, batch: int = 256, own_client: bool = False) -> None:
        if isinstance(streams, (str, bytes)) or (streams is not None and not all(isinstance(s, str) for s in streams)):
            raise ValueError(f"streams: expected a list of stream ids or patterns, or None; got {streams!r}")
        if streams is not None and not streams:
            raise ValueError("streams: expected at least one stream id or pattern, or None for all streams")
        if from_seq is not None and (isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 1):
            raise ValueError(f"from_seq: expected a stream sequence number >= 1 or None, got {from_seq!r}")
        if timeout_s is not None and not (timeout_s >= 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s: expected a non-negative number of seconds or None, got {timeout_s!r}")
        self.client = client
        self.config: ResultsConfig = client.config.results
        self.streams: tuple[str, ...] | None = tuple(streams) if streams is not None else None
        self.timeout_s = timeout_s
        self.last_gap = 0
        self.last_stream_seq = 0 if from_seq is None else from_seq - 1
        self.recreated = 0  # consumers made again after a jump or a lost consumer (for tests and metrics)
        self._start_now = from_seq is None
        self._batch = batch
        self._own_client = own_client
        self._tracker = SeqTracker()
        self._buffer: deque[Msg] = deque()
        self._psub: Any = None
        self._next_dseq = 1
        self._probed = 0.0
        exact = self.streams is not None and not any(_is_pattern(s) for s in self.streams)
        self._exact: tuple[str, ...] | None = self.streams if exact else None
        if exact:
            assert self.streams is not None
            for sid in self.streams:
                stream_token(sid)  # a bad id fails here, not at the first recv

    @classmethod
    def open(cls, client: FleetClient, streams: Sequence[str] | None = None, from_seq: int | None = None,
             timeout_s: float | None = None) -> ResultSubscriber:
        sub = cls(client, streams, from_seq, timeout_s)
        sub._start()
        return sub

    @classmethod
    def connect(cls, config: FleetConfig, streams: Sequence[str] | None = None, from_seq: int | None = None,
                timeout_s: float | None = None, name: str = "maskstream-subscriber") -> ResultSubscriber:
        client = FleetClient.connect(config, name=name)
        try:
            sub = cls(client, streams, from_seq, timeout_s, own_client=True)
            sub._start()
        except BaseException:
            client.close()
            raise
        return sub

    @property
    def stats(self) -> dict[str, StreamStats]:
        return dict(self._tracker.stats)

    def recv(self, timeout_s: float | None = None) -> Published:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._buffer:
                msg = self._buffer.popleft()
                message = self._accept(msg)
                if message is not None:
                    return message
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"{self.config.stream}: no result in {timeout} s")
            try:
                self._buffer.extend(self.client.run(self._fetch(max(wait, 0.01)),
                                                    timeout_s=wait + 2 * self.client.config.nats.request_timeout_s))
            except FleetUnavailable:  # a server died, a leader is being elected: ask again until the deadline
                time.sleep(min(0.2, max(wait, 0.0)))

    def __iter__(self) -> Iterator[Published]:
        return self

    def __next__(self) -> Published:
        if self._exact is not None and all(
                sid in self._tracker.stats and self._tracker.stats[sid].ended for sid in self._exact):
            raise StopIteration
        return self.recv()

    def close(self) -> None:
        if self._psub is not None:
            psub, self._psub = self._psub, None
            try:
                self.client.run(psub.unsubscribe(), timeout_s=self.client.config.nats.request_timeout_s)
            except FleetError:
                pass  # the consumer goes by itself after its inactive threshold
        if self._own_client:
            self.client.close()

    def __enter__(self) -> ResultSubscriber:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _start(self) -> None:
        # A subscriber started while a server restarts or the stream elects its leader waits it out,
        # as a publish does, instead of failing on the first unanswered request.
        self.client.run(retrying(self._create, self.config.publish_timeout_s, f"{self.config.stream}: subscribe"))

    def _accept(self, msg: Msg) -> Published | None:
        sseq = msg.metadata.sequence.stream
        if sseq <= self.last_stream_seq:
            return None  # already returned before a consumer was recreated
        token = msg.subject.rsplit(".", 1)[-1]
        self.last_stream_seq = sseq
        where = f"{self.config.stream} seq {sseq} ({msg.subject})"
        sid = stream_from_token(token)
        if self.streams is not None and not any(fnmatch.fnmatchcase(sid, p) for p in self.streams):
            return None
        message = decode_result(msg.data, where=where)
        if message.header.stream_id != sid:
            raise MessageError(f"{where}: holds stream {message.header.stream_id!r}, the subject says {sid!r}")
        self.last_gap = self._tracker.observe(message)
        return message

    def _filter(self) -> list[str]:
        prefix = self.config.subject_prefix
        if self._exact is None:
            return [f"{prefix}.*"]  # patterns are matched here, on the stream ids
        return [subject_of(prefix, sid) for sid in self._exact]

    async def _create(self) -> None:
        js = self.client.js
        if self._start_now:
            info = await js.stream_info(self.config.stream)
            self.last_stream_seq = info.state.last_seq
            self._start_now = False
        filters = self._filter()
        consumer = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.last_stream_seq + 1,
            ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, num_replicas=1, mem_storage=True,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
        )
        old, self._psub = self._psub, None
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception:  # noqa: BLE001  (its server may be gone; the consumer expires by itself)
                pass
        self._psub = await js.pull_subscribe(filters[0], durable=None, stream=self.config.stream, config=consumer)
        self._next_dseq = 1
        self._probed = asyncio.get_running_loop().time()

    async def _fetch(self, timeout: float) -> list[Msg]:
        """The next messages in order; recreates the consumer after a jump or when it is gone."""
        if self._psub is None:
            await self._create()
        try:
            msgs = await self._psub.fetch(self._batch, timeout=timeout)
        except UNAVAILABLE:  # nothing new, or nobody serving the consumer any more
            await self._probe(force=False)
            return []
        except nats.errors.Error:  # a status the consumer cannot go on from (e.g. it was deleted)
            await self._probe(force=True)
            return []
        out = []
        for msg in msgs:
            seqs = msg.metadata.sequence
            if seqs.consumer != self._next_dseq:  # a delivery went missing: start again after the last one kept
                self.recreated += 1
                self._psub = None
                break
            self._next_dseq += 1
            out.append(msg)
        if out:
            self._probed = asyncio.get_running_loop().time()
        return out

    async def _probe(self, force: bool) -> None:
        """After a quiet spell, check the consumer still exists; make it again if not (its server died)."""
        now = asyncio.get_running_loop().time()
        if not force and now - self._probed < 2.0:
            return
        self._probed = now
        try:
            if force:
                raise nats.errors.Error("recreate")
            await self._psub.consumer_info()
        except (*UNAVAILABLE, nats.errors.Error):
            self.recreated += 1
            self._psub = None
            try:
                await self._create()
            except (*UNAVAILABLE, nats.errors.Error):
                pass  # the cluster is electing leaders: the next fetch tries again


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")
