"""The messages that travel between stages, and their one wire encoding.

Every message is a frozen dataclass of scalars, strings, tuples and numpy arrays, with a
`Header` first. On the wire a message is a list of ZeroMQ frames:

    [topic, header, buffer0, buffer1, ...]

- topic: the stream id in UTF-8 (so a SUB socket can filter on it);
- header: msgpack map {"v": SCHEMA_VERSION, "kind": class name, "fields": {...}}, where an
  array field is replaced by {"nd": i, "dtype": "<f4", "shape": [...]} pointing at buffer i;
- buffers: the raw bytes of each array, C order, never copied into the header.

This is pyzmq's "header + raw buffers" pattern: arrays cross a socket without pickling and
are rebuilt with `np.frombuffer` (zero copy, read-only). The transport may swap a large
buffer for a shared-memory slot; that is its business, not the message's.

Order: within a stream, Header.seq is the frame's index in its source. Offline sources
number every frame, so seq is contiguous (0, 1, 2, ..., EndOfStream at n) and the publish
stage restores order after parallel workers by seq alone; live gaps in seq are drops.

`StageReport` is the control-plane message a stage sends its supervisor (heartbeat,
counters, per-stream progress, a fatal error); `encode_report`/`decode_report` carry it
with the same strict machinery, on the supervisor's socket only.

`decode` trusts nothing: a foreign or truncated message raises `MessageError` saying which
part was wrong, so a stage can drop it and keep serving the other streams. The header's fields
are checked by the package's one codec (configs/codec.py: the type rules of configs and engine
manifests too), compiled once per message class; arrays are its one extra leaf type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from maskstream.configs import codec

__all__ = [
    "SCHEMA_VERSION",
    "Detections",
    "EndOfStream",
    "Frame",
    "Header",
    "Message",
    "MessageError",
    "ModelInput",
    "RawDetections",
    "StageReport",
    "LostFrame",
    "StageStamp",
    "StreamProgress",
    "decode",
    "decode_report",
    "encode",
    "encode_report",
]

# Bumped whenever a field changes meaning or type; subscribers check it.
SCHEMA_VERSION = 1


class MessageError(ValueError):
    """A message could not be decoded or does not satisfy its schema."""


@dataclass(frozen=True)
class StageStamp:
    """When one stage received a message and when it sent its result (time.monotonic, seconds).

    CLOCK_MONOTONIC is shared by all processes of a host, so stamps from different stages
    of one machine can be subtracted."""

    stage: str
    start: float
    end: float


@dataclass(frozen=True)
class Header:
    """What every message carries about its frame.

    seq is the frame's index in its source, counting frames dropped before inference, so a
    subscriber sees every drop as a gap. drops holds, per stage, how many frames of this
    stream that stage has dropped so far (cumulative)."""

    stream_id: str
    seq: int
    pts_s: float | None = None
    stamps: tuple[StageStamp, ...] = ()
    drops: tuple[tuple[str, int], ...] = ()

    def stamped(self, stage: str, start: float, end: float) -> Header:
        return dataclasses.replace(self, stamps=(*self.stamps, StageStamp(stage, start, end)))

    def with_drops(self, stage: str, total: int) -> Header:
        others = tuple((name, n) for name, n in self.drops if name != stage)
        return dataclasses.replace(self, drops=(*others, (stage, int(total))))


@dataclass(frozen=True)
class Frame:
    """decode -> preprocess: one decoded frame (internal: subscribers never see it).

    pixel_format "rgb24": image is uint8 [H, W, 3] RGB; "yuv420p" / "yuvj420p": uint8
    [H * 3 / 2, W], the decoder's I420 planes as they are (BT.601, limited / full range, H and W
    even), see pipeline.media.pixels."""

    header: Header
    image: np.ndarray
    pixel_format: str = "rgb24"


@dataclass(frozen=True)
class ModelInput:
    """preprocess -> infer: a frame resized and padded to the runner's fixed input."""

    header: Header
    image: np.ndarray  # uint8 [3, h, w], the runner's input size; padding in model.static.pad_value
    valid_hw: tuple[int, int]  # the resized frame's size inside the padded input
    frame_hw: tuple[int, int]  # the original frame's size, to rescale boxes back


@dataclass(frozen=True)
class RawDetections:
    """infer -> postprocess: the runner's fixed-size outputs for one frame, cut to num."""

    header: Header
    boxes: np.ndarray  # float32 [N, 4] xyxy in model-input pixels
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N]
    mask_probs: np.ndarray  # float32 [N, 28, 28], unpasted
    valid_hw: tuple[int, int]
    frame_hw: tuple[int, int]


@dataclass(frozen=True)
class Detections:
    """postprocess -> publish -> subscribers: the frame's instances in frame pixels.

    Masks are box-cropped COCO RLE: mask i covers crop_boxes[i] (x0, y0, x1, y1, ends
    exclusive) and its RLE has size [y1 - y0, x1 - x0]; full-frame masks never travel.
    `model.rle.decode_box_cropped_rle` (or `pipeline.results.masks`) rebuilds the full-frame masks."""

    header: Header
    frame_hw: tuple[int, int]
    boxes: np.ndarray  # float32 [N, 4] xyxy in frame pixels
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int32 [N]
    class_names: tuple[str, ...]  # [N], the name of each instance's label
    crop_boxes: np.ndarray  # int32 [N, 4]
    rle_counts: tuple[bytes, ...]  # [N], pycocotools compressed counts of each crop


@dataclass(frozen=True)
class EndOfStream:
    """The source of a stream has ended; sent after its last frame, in order.

    seq is one past the last frame's seq, i.e. the number of frames the source produced.
    error is empty for a normal end, else why the source stopped (e.g. a corrupt file)."""

    header: Header
    error: str = ""


@dataclass(frozen=True)
class StreamProgress:
    """One stream as one stage sees it: frames handled, frames dropped, whether it ended.

    next_seq is the seq the stage expects next (for publish: everything below it has been
    published or counted as lost), so a restarted decoder can resume from there."""

    stream_id: str
    frames: int = 0
    drops: int = 0
    next_seq: int = 0
    ended: bool = False
    error: str = ""


@dataclass(frozen=True)
class LostFrame:
    """A message a stage received and could not pass on (malformed, its processing raised, its ring
    slot was reclaimed): the frame it was, for the supervisor to send again (docs/delivery.md).

    decoded_at is the frame's "source" stamp (time.monotonic() when its decoder made it), which tells
    a frame of the decoder's current life from one a rewind is already sending again; 0.0 when the
    message carried none."""

    stream_id: str
    seq: int
    decoded_at: float
    reason: str


@dataclass(frozen=True)
class StageReport:
    """stage -> supervisor: a heartbeat with the stage's counters (cumulative since start).

    fatal is set on the last report of a stage that cannot go on (e.g. a wrong engine). Heartbeats
    come from a thread of their own, so they go on while the stage works on one message for long
    (a CPU forward): working_on says what, since working_since."""

    stage: str
    pid: int
    sent_at: float  # time.monotonic() when the stage made the report (its content's age)
    received: int = 0
    sent: int = 0
    malformed: int = 0
    errors: int = 0
    last_error: str = ""
    busy_s: float = 0.0  # seconds spent inside process(), to tell a busy stage from a starved one
    streams: tuple[StreamProgress, ...] = ()
    fatal: str = ""
    gpu_mb: float | None = None  # peak of this process's torch CUDA allocator; None where it has not used CUDA
    starting: bool = False  # sent while the stage is still being made (loading, compiling): alive, not ready
    working_on: str = ""  # what the stage is busy with ("ModelInput cam0#12", "reading its source"); "" idle
    working_since: float = 0.0  # time.monotonic() when it began working on that; 0.0 when idle
    lost: tuple[LostFrame, ...] = ()  # the latest frames this process lost (docs/delivery.md)


Message = Frame | ModelInput | RawDetections | Detections | EndOfStream
_KINDS: dict[str, type] = {cls.__name__: cls for cls in (Frame, ModelInput, RawDetections, Detections, EndOfStream)}


def topic_of(message: Message) -> bytes:
    return message.header.stream_id.encode()


def encode(message: Message) -> list[bytes | memoryview]:
    """[topic, header, buffers...] of a message; arrays are passed as memoryviews, not copied."""
    kind = type(message).__name__
    if kind not in _KINDS:
        raise MessageError(f"encode: expected one of {sorted(_KINDS)}, got {type(message).__name__}")
    buffers: list[memoryview] = []
    fields = codec.to_plain(message, lambda value: _pack_leaf(value, buffers))
    header = msgpack.packb({"v": SCHEMA_VERSION, "kind": kind, "fields": fields}, use_bin_type=True)
    return [topic_of(message), header, *buffers]


def decode(frames: Sequence[Any]) -> Message:
    """The message of `encode`'s frames (bytes, memoryviews or zmq.Frame objects)."""
    if len(frames) < 2:
        raise MessageError(f"expected [topic, header, buffers...], got {len(frames)} frame(s)")
    views = [memoryview(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    try:
        meta = msgpack.unpackb(views[1], raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or not {"v", "kind", "fields"} <= meta.keys():
        raise MessageError("header: expected a map with keys v, kind, fields")
    if meta["v"] != SCHEMA_VERSION:
        raise MessageError(f"header: schema version {meta['v']!r}, this build reads {SCHEMA_VERSION}")
    cls = _KINDS.get(meta["kind"]) if isinstance(meta["kind"], str) else None
    if cls is None:
        raise MessageError(f"header: unknown kind {meta['kind']!r}, expected one of {sorted(_KINDS)}")
    message = _build(cls, meta["fields"], views[2:], meta["kind"])
    topic = bytes(views[0])
    if topic != topic_of(message):
        raise MessageError(f"{meta['kind']}: topic {topic!r} does not match stream id {message.header.stream_id!r}")
    return message


def encode_report(report: StageReport) -> bytes:
    """One msgpack frame (a report carries no arrays)."""
    fields = codec.to_plain(report, lambda value: _pack_leaf(value, []))
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": "StageReport", "fields": fields}, use_bin_type=True)


def decode_report(frame: Any) -> StageReport:
    try:
        meta = msgpack.unpackb(memoryview(frame.buffer if hasattr(frame, "buffer") else frame), raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"report is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("v") != SCHEMA_VERSION or meta.get("kind") != "StageReport":
        raise MessageError(f"expected a StageReport of schema version {SCHEMA_VERSION}")
    report: StageReport = _build(StageReport, meta.get("fields"), [], "StageReport")
    return report


# ---------------------------------------------------------------------------- internals


def _pack_leaf(value: Any, buffers: list[memoryview]) -> Any:
    """What codec.to_plain leaves to the messages: arrays become buffer references, numpy scalars
    Python ones."""
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        # reshape(-1) first: memoryview cannot cast a view with a zero in its shape
        buffers.append(array.reshape(-1).data.cast("B"))
        return {"nd": len(buffers) - 1, "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _build(cls: type[Any], raw: Any, buffers: list[memoryview], where: str) -> Any:
    try:
        return _CODEC.from_plain(cls, raw, buffers)
    except codec.CodecError as exc:
        raise MessageError(f"{codec.format_path((where, *exc.path))}: {exc.problem}") from None


def _array(raw: Any, buffers: list[memoryview]) -> np.ndarray:
    """An array field: a reference {nd, dtype, shape} to one of the message's buffers."""
    if not isinstance(raw, dict) or raw.keys() != _ARRAY_KEYS:
        raise codec.CodecError((), "expected an array reference {nd, dtype, shape}")
    index, shape = raw["nd"], raw["shape"]
    if not isinstance(index, int) or not 0 <= index < len(buffers):
        raise codec.CodecError((), f"buffer {index!r} missing, the message has {len(buffers)} buffer(s)")
    try:
        dtype = np.dtype(raw["dtype"])
    except TypeError:
        raise codec.CodecError((), f"unknown dtype {raw['dtype']!r}") from None
    if dtype.hasobject or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise codec.CodecError((), f"bad dtype {raw['dtype']!r} or shape {shape!r}")
    expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if buffers[index].nbytes != expected:
        raise codec.CodecError((), f"buffer {index} holds {buffers[index].nbytes} bytes, {dtype}{shape} "
                                   f"needs {expected}")
    return np.frombuffer(buffers[index], dtype=dtype).reshape(shape)


_ARRAY_KEYS = frozenset({"nd", "dtype", "shape"})
_CODEC = codec.Codec(leaves={np.ndarray: _array})
