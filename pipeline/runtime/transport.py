"""ZeroMQ sockets between stages, and the internal wire that moves pixels through shared memory.

Sockets (endpoints on loopback: ipc:// paths or tcp://127.0.0.1):
- `Inbox`: a PULL socket that the *consuming* stage binds; every producer connects to it, so
  a restarted consumer binds the same endpoint again and its producers reconnect by themselves.
- `Outbox`: a PUSH socket connected to every instance of the next stage (ZeroMQ spreads
  messages over them round-robin, skipping a peer whose queue is full). SNDHWM/RCVHWM are
  small and explicit: when the queues are full a send waits, which is the back-pressure
  that keeps an offline pipeline lossless; a live decoder sends with `block=False` and drops.
- `Publisher`: the PUB socket of the output, topic = stream id, plain `messages.encode` frames;
  with `CurveServer` keys, CurveZMQ: encrypted, and only subscribers whose public key is in the
  authorised folder get anything (zmq.auth's authenticator, a thread of the publish process).
- `ReportSender` / `ReportInbox`: stage -> supervisor heartbeats (`StageReport`).

Internal wire (between stages only): [topic, header, slots, buffers...] where `slots` is a
msgpack map {buffer index: [ring, slot, generation, nbytes]} for buffers that travel in a
shared-memory ring (pipeline.runtime.shm_ring) instead of the socket; the buffer frame at that
index is empty. Without a ring every buffer goes inline, as across hosts.

What arrives is not trusted (`unpack`): a receiving socket refuses frames larger than its
messages can have (ZMQ_MAXMSGSIZE), a slot reference must name one of the run's rings that the
stage reads, and every field is checked against the run's `messages.Limits`.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.auth.certs
from maskstream.pipeline.runtime.messages import (
    UNBOUNDED,
    Limits,
    Message,
    MessageError,
    StageReport,
    decode,
    decode_report,
    encode,
    encode_report,
)
from maskstream.pipeline.runtime.metrics import MetricsSnapshot
from maskstream.pipeline.runtime.shm_ring import Ring, RingFull, RingReaders, SlotReclaimed, SlotRef

__all__ = [
    "CurveServer",
    "Inbox",
    "Outbox",
    "Publisher",
    "ReportInbox",
    "ReportSender",
    "Received",
    "curve_server",
    "load_keypair",
    "pack",
    "terminate",
    "unpack",
]

# Below this a memcpy into shared memory saves nothing over the socket copy.
RING_MIN_BYTES = 64 * 1024
# The most buffers (array fields) a message has (RawDetections with its masks as crops: 5).
MAX_BUFFERS = 5
# A stage's report and metrics snapshot: a few KiB per stream.
REPORT_MAX_BYTES = 16 << 20


def pack(message: Message, ring: Ring | None = None, wait_s: float | None = None,
         on_wait: Callable[[], None] | None = None) -> tuple[list[Any], list[SlotRef]]:
    """Internal-wire frames of `message` and the ring slots they use.

    A buffer that is a slot the producer claimed from `ring` (filled in place) goes by
    reference, without a copy. Other buffers of at least RING_MIN_BYTES that fit a slot are
    copied into `ring`; the rest go inline. Waits up to wait_s (None: forever) for a free
    slot, then raises RingFull."""
    topic, header, *buffers = encode(message)
    slots: dict[int, list[Any]] = {}
    refs: list[SlotRef] = []
    if ring is not None:
        for i, buffer in enumerate(buffers):
            view = memoryview(buffer)
            if RING_MIN_BYTES <= view.nbytes <= ring.slot_bytes:
                try:
                    ref = ring.take_claim(view) or ring.write(view, timeout_s=wait_s, on_wait=on_wait)
                except RingFull:
                    for taken in refs:
                        ring.release(taken)
                    raise
                refs.append(ref)
                slots[i] = [ref.ring, ref.slot, ref.generation, ref.nbytes]
                buffers[i] = b""
    return [topic, header, msgpack.packb(slots) if slots else b"", *buffers], refs


class Received:
    """A decoded message and the ring slots its arrays point into (release after use)."""

    def __init__(self, message: Message, refs: list[tuple[Ring, SlotRef]]):
        self.message = message
        self._refs = refs

    def intact(self) -> bool:
        """Whether no slot was reclaimed by its producer since it was read: checked after the stage
        used the message, a slot rewritten meanwhile makes what came of it untrustworthy
        (docs/delivery.md, ring slots)."""
        return all(ring.intact(ref) for ring, ref in self._refs)

    def release(self) -> None:
        for ring, ref in self._refs:
            ring.release(ref)
        self._refs = []


def unpack(frames: Sequence[Any], rings: RingReaders, limits: Limits = UNBOUNDED) -> Received:
    """The message of internal-wire frames, every field checked (messages.decode with `limits`);
    raises MessageError saying what is wrong. A slot reference must name a ring that `rings` may
    read, a slot of it, at most a slot's bytes, the slot's current generation (a restarted
    producer's or a made-up reference reads nothing), and its buffer frame must be empty."""
    if not 3 <= len(frames) <= 3 + MAX_BUFFERS:
        raise MessageError(f"expected [topic, header, slots, buffers...] with at most {MAX_BUFFERS} buffers, "
                           f"got {len(frames)} frame(s)")
    views = [memoryview(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    buffers: list[Any] = list(views[3:])
    refs: list[tuple[Ring, SlotRef]] = []
    try:
        if views[2].nbytes:
            for index, ref in _slot_table(views[2], len(buffers)):
                if buffers[index].nbytes:
                    raise MessageError(f"slot table: buffer {index} travels in a ring slot, yet its frame holds "
                                       f"{buffers[index].nbytes} bytes")
                try:
                    ring = rings.ring(ref.ring)
                    buffers[index] = ring.read(ref)
                except (ValueError, SlotReclaimed) as exc:
                    raise MessageError(f"slot table: buffer {index}: {exc}") from None
                refs.append((ring, ref))
        message = decode([views[0], views[1], *buffers], limits)
    except MessageError:
        for ring, ref in refs:  # the slot is ours to free even if the message is garbage
            ring.release(ref)
        raise
    return Received(message, refs)


def _slot_table(view: memoryview, buffers: int) -> list[tuple[int, SlotRef]]:
    """(buffer index, slot reference) of a slot table {buffer index: [ring, slot, generation, nbytes]}."""
    try:
        table = msgpack.unpackb(view, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"slot table is not valid msgpack ({type(exc).__name__})") from None
    if type(table) is not dict:
        raise MessageError("slot table: expected a map {buffer index: [ring, slot, generation, nbytes]}")
    entries = []
    for index, entry in table.items():
        if not (type(index) is int and 0 <= index < buffers and type(entry) is list and len(entry) == 4
                and type(entry[0]) is str and all(type(v) is int for v in entry[1:])):
            raise MessageError(f"slot table: bad entry {index!r}: {entry!r:.200}")
        entries.append((index, SlotRef(*entry)))
    return entries


def terminate() -> None:
    """End this process's ZeroMQ context (after closing its sockets).

    Note: what a socket still queues when its process goes is lost, linger or not: over ipc
    and tcp a message counts as delivered once in the kernel's buffer, and the receiver
    drops what it had not read when the sender disconnects. Producers stay until stopped."""
    zmq.Context.instance().term()


def _context() -> zmq.Context:
    # One context per process, created in that process (never inherited across spawn).
    return zmq.Context.instance()


class Inbox:
    """PULL, bound by the consuming stage.

    max_part_bytes (messages.Limits.max_part_bytes) is the socket's ZMQ_MAXMSGSIZE: ZeroMQ drops
    the connection of a peer that sends a larger frame (or declares one) before reading it, so an
    oversized message never reaches memory; None: no limit."""

    def __init__(self, endpoint: str, hwm: int, max_part_bytes: int | None = None):
        self.endpoint = endpoint
        self.socket = _context().socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if max_part_bytes is not None:
            self.socket.setsockopt(zmq.MAXMSGSIZE, max_part_bytes)
        self.socket.bind(endpoint)

    def recv(self, timeout_s: float) -> list[zmq.Frame] | None:
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        frames: list[zmq.Frame] = self.socket.recv_multipart(copy=False)
        return frames

    def drain(self, limit: int) -> list[list[zmq.Frame]]:
        """Up to `limit` messages already waiting, without waiting for more."""
        queued: list[list[zmq.Frame]] = []
        while len(queued) < limit:
            try:
                queued.append(self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        return queued

    def close(self) -> None:
        self.socket.close(linger=0)


class Outbox:
    """PUSH, connected to every instance of the next stage."""

    def __init__(self, endpoints: Sequence[str], hwm: int):
        self.endpoints = tuple(endpoints)
        self.socket = _context().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        for endpoint in self.endpoints:
            self.socket.connect(endpoint)

    def send(self, frames: list[Any], block: bool, on_wait: Callable[[], None] | None = None,
             wait_slice_s: float = 0.2) -> bool:
        """Send; block=True waits for room (calling on_wait every slice), block=False drops: returns False."""
        while True:
            try:
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                if not block:
                    return False
            self.socket.poll(int(wait_slice_s * 1000), zmq.POLLOUT)
            if on_wait is not None:
                on_wait()

    def close(self) -> None:
        self.socket.close(linger=0)


@dataclass(frozen=True)
class CurveServer:
    """CurveZMQ keys of the publisher: its secret key file and the folder of the public key files of
    the subscribers it lets in (both in zmq.auth's format: zmq.auth.create_certificates writes NAME.key,
    the public key, and NAME.key_secret, both keys). Made by `curve_server`, which checks them."""

    secret_key: Path
    clients: Path


def load_keypair(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a zmq.auth key file; secret=True: the file must hold the secret key
    too (NAME.key_secret). ValueError naming the file when it cannot be read or holds no such key."""
    try:
        public, secret_key = zmq.auth.certs.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a CurveZMQ key file ({exc}); make keys with "
                         "python -c \"import zmq.auth; zmq.auth.create_certificates('DIR', 'NAME')\"") from None
    if secret and secret_key is None:
        raise ValueError(f"{path}: holds only a public key; expected the secret key file (NAME.key_secret)")
    return public, secret_key


def curve_server(secret_key: Path, clients: Path) -> CurveServer:
    """CurveServer keys, checked: the publisher's secret key file, and a folder that holds at least
    one client public key (*.key). ValueError naming what is wrong."""
    load_keypair(secret_key, secret=True)
    if not clients.is_dir():
        raise ValueError(f"{clients}: expected a folder of the authorised subscribers' public key files (*.key)")
    if not zmq.auth.certs.load_certificates(clients):
        raise ValueError(f"{clients}: no public key files (*.key) in it: no subscriber could get in")
    return CurveServer(secret_key, clients)


class Publisher:
    """PUB, bound; subscribers connect. Plain `messages.encode` frames (never ring slots).
    With `curve`, CurveZMQ (see CurveServer); the authenticator reads the client keys at start."""

    def __init__(self, endpoint: str, hwm: int, curve: CurveServer | None = None):
        self.endpoint = endpoint
        self.auth: Any = None  # zmq.auth.thread.ThreadAuthenticator, with curve
        self.socket = _context().socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 1000)
        try:
            if curve is not None:
                public, secret = load_keypair(curve.secret_key, secret=True)
                from zmq.auth.thread import ThreadAuthenticator  # asyncio and more: only where it is used

                # Before the bind: a handshake that finds no authenticator is let through.
                self.auth = ThreadAuthenticator(_context(), log=logging.getLogger("maskstream.publish.curve"))
                self.auth.start()
                self.auth.configure_curve(domain="*", location=str(curve.clients))
                self.socket.curve_secretkey = secret
                self.socket.curve_publickey = public
                self.socket.curve_server = True
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close(linger=0)
            raise ValueError(f"publish endpoint {endpoint!r}: cannot bind ({exc})") from None
        except BaseException:
            self.close(linger=0)
            raise

    def send(self, message: Message) -> None:
        self.socket.send_multipart(encode(message), copy=False)

    def close(self, linger: int | None = None) -> None:
        self.socket.close(linger=linger)
        if self.auth is not None:
            self.auth.stop()  # its sockets are on the context, which must be without sockets to end
            self.auth = None


class ReportSender:
    """PUSH to the supervisor; never blocks (a supervisor that is behind loses heartbeats, not frames)."""

    def __init__(self, endpoint: str):
        self.socket = _context().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 100)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.connect(endpoint)

    def send(self, report: StageReport, metrics: MetricsSnapshot) -> None:
        frames = [encode_report(report), msgpack.packb(dataclasses.asdict(metrics))]
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.socket.close()


class ReportInbox:
    """PULL bound by the supervisor."""

    def __init__(self, endpoint: str):
        self.socket = _context().socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, REPORT_MAX_BYTES)
        self.socket.bind(endpoint)

    def recv_all(self, timeout_s: float) -> list[tuple[StageReport, MetricsSnapshot | None]]:
        """Every report waiting, after waiting up to timeout_s for the first; garbage is skipped."""
        reports: list[tuple[StageReport, MetricsSnapshot | None]] = []
        if not self.socket.poll(int(timeout_s * 1000)):
            return reports
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return reports
            try:
                report = decode_report(frames[0])
            except MessageError:
                continue
            metrics = None
            if len(frames) > 1:
                try:
                    metrics = MetricsSnapshot.from_dict(msgpack.unpackb(frames[1], raw=False))
                except Exception:  # garbage of any shape: the report still counts, without metrics
                    metrics = None
            reports.append((report, metrics))

    def close(self) -> None:
        self.socket.close()

