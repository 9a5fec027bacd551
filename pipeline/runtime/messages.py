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

`decode` trusts nothing: a foreign, truncated or crafted message raises `MessageError` naming
the field that was wrong, before any stage uses it, so a stage can drop it and keep serving the
other streams. The header's fields are typed by the package's one codec (configs/codec.py: the
type rules of configs and engine manifests too), compiled once per message class; arrays are its
one extra leaf type, their dtypes from an allow-list and their sizes computed in Python ints
(never a numpy product that wraps). Then every field is checked against its message type (each
array's dtype and shape, lengths that must agree, values in range: valid_hw inside the input,
boxes inside their image, labels among the classes) and against the run's `Limits` (its
streams, the largest frame, the inference contract's input size and K, the kinds a stage's
inbox takes, stamps of this host's clock not in the future). `Limits()` bounds only what no run
allows (the subscriber's default).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
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
    "Limits",
    "Message",
    "MessageError",
    "ModelInput",
    "RawDetections",
    "StageReport",
    "LostFrame",
    "StageStamp",
    "StreamProgress",
    "UNBOUNDED",
    "decode",
    "decode_report",
    "encode",
    "encode_report",
]

# Bumped whenever a field changes meaning or type; subscribers check it.
SCHEMA_VERSION = 1


class MessageError(ValueError):
    """A message could not be decoded or does not satisfy its schema.

    header: the message's own Header when that much of it was well-formed (e.g. only an array
    or a ring reference was wrong), the frame it claims to be; None when even that was not."""

    def __init__(self, problem: str, header: Header | None = None):
        super().__init__(problem)
        self.header = header


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
    """infer -> postprocess: the runner's fixed-size outputs for one frame, cut to num.

    The masks come in one of two forms (infer.masks): the mask head's probabilities, which
    postprocess pastes into their boxes; or, pasted and thresholded where the model ran
    (model.mask_crops), each instance's binary crop inside the frame: crop_boxes and crop_bits
    instead of mask_probs (None), which postprocess encodes as they are."""

    header: Header
    boxes: np.ndarray  # float32 [N, 4] xyxy in model-input pixels
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N]
    mask_probs: np.ndarray | None  # float32 [N, 28, 28], unpasted; None where the crops carry the masks
    valid_hw: tuple[int, int]
    frame_hw: tuple[int, int]
    # int32 [N, 4]: each mask's crop x0, y0, x1, y1 in frame pixels, ends exclusive, inside the frame
    crop_boxes: np.ndarray | None = None
    # uint8 [ceil(P / 8)]: the P pixels of the crops (P: their areas' sum), each crop row by row, back
    # to back, packed as np.packbits packs them (the first pixel in the high bit, spare bits 0)
    crop_bits: np.ndarray | None = None


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

# Model-independent bounds of any message (a run's own Limits are tighter).
MAX_NAME_CHARS = 256  # a stream id, a class name
MAX_STAGE_CHARS = 64  # a stage name in stamps and drops
MAX_STAMPS = 16  # stamps, and drops entries, of one header
MAX_ERROR_CHARS = 65536  # an EndOfStream's error
MAX_SEQ = 2**53  # seq stays exact as a JSON number
MASK_SIZE = 28  # RawDetections.mask_probs [N, M, M]: the mask head's output (model.roi_heads)
# A header's own fields (stamps, drops, names, an error) fit in this; the Detections' RLEs come on top.
_CLOCK_SLACK_S = 1.0  # a stamp taken by another process of this host just now
_HEADER_BYTES = 1 << 20
_MARGIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one inbox accepts: a message outside these is refused (`decode` raises MessageError).

    pipeline.run_config.plan makes them from the run's config and its inference contract, one per
    stage (`kinds`: what that stage takes). Empty or None: not bounded by the run (`Limits()`, a
    subscriber's default, checks the message's own consistency only). `max_part_bytes` is the
    largest ZeroMQ frame such a message can have, the inbox's ZMQ_MAXMSGSIZE."""

    kinds: tuple[str, ...] = ()  # message kinds (class names) accepted; empty: any
    streams: tuple[str, ...] = ()  # the run's stream ids
    max_frame_side: int | None = None  # a frame's height and width (transport.max_frame_side)
    input_hw: tuple[int, int] | None = None  # ModelInput.image is [3, H, W] (the inference contract)
    detections: int | None = None  # K: instances per frame at most
    class_names: tuple[str, ...] = ()  # labels index these, and Detections name them so
    mask_size: int = MASK_SIZE
    # Stamps are this host's time.monotonic() (the run's stages): none may lie in the future.
    same_host: bool = False
    # The form of RawDetections' masks the run's inference process sends (infer.masks): "probs" or
    # "crops"; "": either.
    raw_masks: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - _KINDS.keys()
        if unknown:
            raise ValueError(f"kinds: {sorted(unknown)} are not message kinds ({sorted(_KINDS)})")
        if self.raw_masks not in ("", "probs", "crops"):
            raise ValueError(f"raw_masks: expected '', 'probs' or 'crops', got {self.raw_masks!r}")

    def max_part_bytes(self) -> int | None:
        """The largest frame (ZeroMQ message part) of an accepted message, with a margin; None where
        a bound it needs is not set. ZeroMQ applies ZMQ_MAXMSGSIZE to each part."""
        side, k, m = self.max_frame_side, self.detections, self.mask_size
        largest = _HEADER_BYTES
        for kind in self.kinds or tuple(_KINDS):
            if kind == "Frame":
                if side is None:
                    return None
                largest = max(largest, 3 * side * side)  # rgb24 inline (yuv420p is half)
            elif kind == "ModelInput":
                h, w = self.input_hw or (side, side)
                if h is None or w is None:
                    return None
                largest = max(largest, 3 * h * w)
            elif kind == "RawDetections":
                if k is None:
                    return None
                largest = max(largest, 4 * k * m * m)
                if self.raw_masks != "probs":  # K crops, each at most the whole frame, a bit a pixel
                    if side is None:
                        return None
                    largest = max(largest, (k * side * side + 7) // 8)
            elif kind == "Detections":
                if k is None or side is None:
                    return None
                # The header carries every instance's RLE and class name.
                largest = max(largest, _HEADER_BYTES + k * (int(_rle_max_bytes(side, side, m)) + 4 * MAX_NAME_CHARS))
        return largest + _MARGIN_BYTES


UNBOUNDED = Limits()  # a message's own consistency only: what a reader without a run's limits checks


def _rle_max_bytes(height: Any, width: Any, mask_size: int) -> Any:
    """The longest compressed RLE of a height x width crop of a pasted mask. A column of the crop is
    the M x M mask (M + 2 with the paste's padding) interpolated linearly between rows, so it crosses
    the threshold at most M + 1 times: at most M + 2 runs per column, doubled for rounding's sake,
    and never more than one run per pixel. A count takes at most 7 characters of 5 bits."""
    return 7 * (np.minimum(height * width, (2 * mask_size + 6) * width) + 1)


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


def decode(frames: Sequence[Any], limits: Limits = UNBOUNDED) -> Message:
    """The message of `encode`'s frames (bytes, memoryviews or zmq.Frame objects), every field
    checked (see the module docstring); raises MessageError naming the first field that is wrong."""
    if len(frames) < 2:
        raise MessageError(f"expected [topic, header, buffers...], got {len(frames)} frame(s)")
    views = [memoryview(f.buffer if hasattr(f, "buffer") else f) for f in frames]
    try:
        meta = msgpack.unpackb(views[1], raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MessageError(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if type(meta) is not dict or not {"v", "kind", "fields"} <= meta.keys():
        raise MessageError("header: expected a map with keys v, kind, fields")
    if meta["v"] != SCHEMA_VERSION or type(meta["v"]) is not int:
        raise MessageError(f"header: schema version {meta['v']!r}, this build reads {SCHEMA_VERSION}")
    kind = meta["kind"]
    cls = _KINDS.get(kind) if type(kind) is str else None
    if cls is None:
        raise MessageError(f"header: unknown kind {kind!r}, expected one of {sorted(_KINDS)}")
    if limits.kinds and kind not in limits.kinds:
        raise MessageError(f"header: kind {kind} is not taken here (this inbox takes {', '.join(limits.kinds)})")
    buffers = views[2:]
    used: set[int] = set()
    try:
        message: Message = _CODEC.from_plain(cls, meta["fields"], (buffers, used))
        _CHECKS[cls](message, limits)
        if len(used) != len(buffers):
            raise codec.CodecError((), f"{len(buffers)} buffer frame(s), the fields reference {len(used)}")
    except codec.CodecError as exc:
        raise MessageError(f"{codec.format_path((kind, *exc.path))}: {exc.problem}",
                           _claimed_header(meta["fields"], limits)) from None
    topic = bytes(views[0])
    if topic != topic_of(message):
        raise MessageError(f"{kind}: topic {topic!r} does not match stream id {message.header.stream_id!r}")
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
        return _CODEC.from_plain(cls, raw, (buffers, set()))
    except codec.CodecError as exc:
        raise MessageError(f"{codec.format_path((where, *exc.path))}: {exc.problem}") from None


# Every dtype a message carries, by the string `encode` writes (native byte order); a header naming
# any other (a structured, object, zero-size or subarray dtype) is refused before numpy parses it.
_DTYPES = {np.dtype(t).str: np.dtype(t) for t in (np.uint8, np.int32, np.int64, np.float32)}
_U8, _I4, _I8, _F4 = (np.dtype(t) for t in (np.uint8, np.int32, np.int64, np.float32))
_MAX_NDIM = 4
_ARRAY_KEYS = frozenset({"nd", "dtype", "shape"})


def _array(raw: Any, context: tuple[Sequence[memoryview], set[int]]) -> np.ndarray:
    """An array field: a reference {nd, dtype, shape} to one of the message's buffers, each buffer
    referenced once, its size exactly what dtype and shape need (Python ints: no product wraps)."""
    buffers, used = context
    if type(raw) is not dict or raw.keys() != _ARRAY_KEYS:
        raise codec.CodecError((), "expected an array reference {nd, dtype, shape}")
    index, name, shape = raw["nd"], raw["dtype"], raw["shape"]
    if type(index) is not int or not 0 <= index < len(buffers):
        raise codec.CodecError((), f"buffer {index!r} missing, the message has {len(buffers)} buffer(s)")
    if index in used:
        raise codec.CodecError((), f"buffer {index} is referenced twice")
    dtype = _DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise codec.CodecError((), f"dtype {name!r} is not one a message carries ({', '.join(_DTYPES)})")
    if type(shape) is not list or len(shape) > _MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
        raise codec.CodecError((), f"shape {shape!r}: expected a list of at most {_MAX_NDIM} ints >= 0")
    expected = dtype.itemsize * math.prod(shape)
    if buffers[index].nbytes != expected:
        raise codec.CodecError((), f"buffer {index} holds {buffers[index].nbytes} bytes, {dtype}{shape} "
                                   f"needs {expected}")
    used.add(index)
    return np.frombuffer(buffers[index], dtype=dtype).reshape(shape)


_CODEC = codec.Codec(leaves={np.ndarray: _array})


def _claimed_header(fields: Any, limits: Limits) -> Header | None:
    """The Header of a message refused for another field, if the header itself is well-formed."""
    try:
        header = _CODEC.from_plain(Header, fields.get("header") if type(fields) is dict else None)
        _check_header(header, limits)
    except codec.CodecError:
        return None
    return header


# ---------------------------------------------------------------------------- field checks
# One function per message type, run on the decoded message: CodecError((field, ...), problem).


def _fail(path: tuple[str | int, ...], problem: str) -> None:
    raise codec.CodecError(path, problem)


def _check_header(h: Header, limits: Limits) -> None:
    if limits.streams:
        if h.stream_id not in limits.streams:
            _fail(("header", "stream_id"), f"{h.stream_id[:MAX_NAME_CHARS]!r} is not a stream of this run")
    elif not 0 < len(h.stream_id) <= MAX_NAME_CHARS:
        _fail(("header", "stream_id"), f"expected 1 to {MAX_NAME_CHARS} characters, got {len(h.stream_id)}")
    if not 0 <= h.seq < MAX_SEQ:
        _fail(("header", "seq"), f"{h.seq} is outside [0, 2**53)")
    if h.pts_s is not None and not math.isfinite(h.pts_s):
        _fail(("header", "pts_s"), f"{h.pts_s} is not a finite number")
    if len(h.stamps) > MAX_STAMPS:
        _fail(("header", "stamps"), f"{len(h.stamps)} stamps, at most {MAX_STAMPS}")
    latest = time.monotonic() + _CLOCK_SLACK_S if limits.same_host and h.stamps else math.inf
    for i, stamp in enumerate(h.stamps):
        if not 0 < len(stamp.stage) <= MAX_STAGE_CHARS:
            _fail(("header", "stamps", i, "stage"), f"expected 1 to {MAX_STAGE_CHARS} characters")
        if not 0.0 <= stamp.start <= stamp.end < latest:
            _fail(("header", "stamps", i), f"start {stamp.start}, end {stamp.end}: expected 0 <= start <= end, finite"
                                           f"{', not later than now' if limits.same_host else ''}")
    if len(h.drops) > MAX_STAMPS:
        _fail(("header", "drops"), f"{len(h.drops)} entries, at most {MAX_STAMPS}")
    for i, (stage, count) in enumerate(h.drops):
        if not 0 < len(stage) <= MAX_STAGE_CHARS or not 0 <= count < MAX_SEQ:
            _fail(("header", "drops", i),
                  f"expected [stage name, count >= 0], got [{stage[:MAX_STAGE_CHARS]!r}, {count}]")


def _check_shape(array: np.ndarray, field: str, dtypes: tuple[np.dtype[Any], ...], shape: tuple[int | None, ...]
                 ) -> None:
    """dtype one of `dtypes`, shape `shape` (None: any length)."""
    if array.dtype not in dtypes or array.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape)):
        wanted = "[" + ", ".join("*" if n is None else str(n) for n in shape) + "]"
        _fail((field,), f"expected {' or '.join(str(d) for d in dtypes)} {wanted}, got {array.dtype} "
                        f"{list(array.shape)}")


def _check_hw(hw: tuple[int, int], field: str, bound: tuple[int, int] | None, what: str) -> None:
    """1 <= h, w (<= bound)."""
    h, w = hw
    if h < 1 or w < 1 or (bound is not None and (h > bound[0] or w > bound[1])):
        within = f", at most {list(bound)} ({what})" if bound is not None else ""
        _fail((field,), f"{list(hw)}: expected sides >= 1{within}")


def _frame_bound(limits: Limits) -> tuple[int, int] | None:
    side = limits.max_frame_side
    return None if side is None else (side, side)


def _check_count(n: int, limits: Limits, field: str) -> None:
    if limits.detections is not None and n > limits.detections:
        _fail((field,), f"{n} instances, this run's model gives at most K = {limits.detections}")


def _check_boxes(boxes: np.ndarray, field: str, hw: tuple[int, int], slack: float) -> None:
    """xyxy inside an image of hw (with `slack` pixels for float rounding), finite, x0 <= x1, y0 <= y1."""
    if not len(boxes):
        return
    h, w = hw
    low, high = boxes[:, :2], boxes[:, 2:]
    # NaN fails every comparison, so it is refused with the rest.
    if not ((low >= 0).all() and (high >= low).all() and (high <= (w + slack, h + slack)).all()):
        inside = (low >= 0).all(axis=1) & (high >= low).all(axis=1) & (high <= (w + slack, h + slack)).all(axis=1)
        i = int(np.flatnonzero(~inside)[0])
        _fail((field, i), f"{boxes[i].tolist()} is not a box inside the {h}x{w} image")


def _check_scores(scores: np.ndarray, field: str) -> None:
    if len(scores) and not (scores.min() >= 0 and scores.max() <= 1):  # NaN fails both
        _fail((field,), "expected scores in [0, 1]")


def _check_labels(labels: np.ndarray, field: str, limits: Limits) -> None:
    if not len(labels):
        return
    top = len(limits.class_names) if limits.class_names else 2**31
    if int(labels.min()) < 0 or int(labels.max()) >= top:
        _fail((field,), f"labels {int(labels.min())}..{int(labels.max())}: expected 0 <= label < {top}")


def _check_frame(m: Frame, limits: Limits) -> None:
    _check_header(m.header, limits)
    image = m.image
    if m.pixel_format == "rgb24":
        _check_shape(image, "image", (_U8,), (None, None, 3))
        hw = image.shape[0], image.shape[1]
    elif m.pixel_format in ("yuv420p", "yuvj420p"):  # I420 planes [H * 3 / 2, W], H and W even
        _check_shape(image, "image", (_U8,), (None, None))
        rows, width = image.shape
        if rows % 3 or (rows * 2 // 3) % 2 or width % 2:
            _fail(("image",), f"{list(image.shape)}: expected I420 planes [H * 3 / 2, W] with H, W even")
        hw = rows * 2 // 3, width
    else:
        _fail(("pixel_format",), f"{m.pixel_format[:MAX_NAME_CHARS]!r}: expected rgb24, yuv420p or yuvj420p")
    _check_hw(hw, "image", _frame_bound(limits), "transport.max_frame_side")


def _check_model_input(m: ModelInput, limits: Limits) -> None:
    _check_header(m.header, limits)
    if limits.input_hw is not None:
        _check_shape(m.image, "image", (_U8,), (3, *limits.input_hw))
    else:
        _check_shape(m.image, "image", (_U8,), (3, None, None))
        _check_hw((m.image.shape[1], m.image.shape[2]), "image", _frame_bound(limits), "transport.max_frame_side")
    _check_hw(m.valid_hw, "valid_hw", (m.image.shape[1], m.image.shape[2]), "the input")
    _check_hw(m.frame_hw, "frame_hw", _frame_bound(limits), "transport.max_frame_side")


def _check_instances(m: RawDetections | Detections, limits: Limits, label_dtypes: tuple[np.dtype, ...]) -> int:
    """The header and the per-instance arrays both detection messages carry; their count."""
    _check_header(m.header, limits)
    n = len(m.boxes) if m.boxes.ndim else 0
    _check_shape(m.boxes, "boxes", (_F4,), (n, 4))
    _check_count(n, limits, "boxes")
    _check_shape(m.scores, "scores", (_F4,), (n,))
    _check_shape(m.labels, "labels", label_dtypes, (n,))
    return n


def _check_raw_detections(m: RawDetections, limits: Limits) -> None:
    n = _check_instances(m, limits, (_I8, _I4))
    input_bound = limits.input_hw or _frame_bound(limits)
    _check_hw(m.valid_hw, "valid_hw", input_bound, "the model's input")
    _check_hw(m.frame_hw, "frame_hw", _frame_bound(limits), "transport.max_frame_side")
    _check_boxes(m.boxes, "boxes", m.valid_hw, 1.0)  # the model clips them to the valid region
    _check_scores(m.scores, "scores")
    _check_labels(m.labels, "labels", limits)
    form = "probs" if m.mask_probs is not None else "crops"
    if (m.mask_probs is None) == (m.crop_boxes is None) or (m.crop_boxes is None) != (m.crop_bits is None):
        given = [name for name in ("mask_probs", "crop_boxes", "crop_bits") if getattr(m, name) is not None]
        _fail(("mask_probs",), f"expected the masks as mask_probs, or as crop_boxes and crop_bits; got "
                               f"{' and '.join(given) or 'none of them'}")
    if limits.raw_masks and form != limits.raw_masks:
        _fail(("mask_probs",), f"the masks as {form}, this run's inference sends {limits.raw_masks} (infer.masks)")
    if m.mask_probs is not None:
        size = limits.mask_size
        _check_shape(m.mask_probs, "mask_probs", (_F4,), (n, size, size))
        return
    assert m.crop_boxes is not None and m.crop_bits is not None
    _check_shape(m.crop_boxes, "crop_boxes", (_I4,), (n, 4))
    _check_boxes(m.crop_boxes, "crop_boxes", m.frame_hw, 0.0)
    # Inside the frame, so each area fits int64; their sum is taken in Python ints.
    areas = (m.crop_boxes[:, 2] - m.crop_boxes[:, 0]).astype(np.int64) * (m.crop_boxes[:, 3] - m.crop_boxes[:, 1])
    pixels = sum(areas.tolist())
    _check_shape(m.crop_bits, "crop_bits", (_U8,), ((pixels + 7) // 8,))
    if pixels % 8 and int(m.crop_bits[-1]) & (0xFF >> (pixels % 8)):
        _fail(("crop_bits",), f"the last byte's {8 - pixels % 8} spare bit(s) are not 0")


def _check_detections(m: Detections, limits: Limits) -> None:
    n = _check_instances(m, limits, (_I4,))
    _check_shape(m.crop_boxes, "crop_boxes", (_I4,), (n, 4))
    _check_hw(m.frame_hw, "frame_hw", _frame_bound(limits), "transport.max_frame_side")
    _check_boxes(m.boxes, "boxes", m.frame_hw, 1.0)  # rescaled in float32 from the clipped model boxes
    _check_boxes(m.crop_boxes, "crop_boxes", m.frame_hw, 0.0)
    _check_scores(m.scores, "scores")
    _check_labels(m.labels, "labels", limits)
    if len(m.class_names) != n or len(m.rle_counts) != n:
        _fail(("class_names",), f"{len(m.class_names)} names and {len(m.rle_counts)} RLEs for {n} instances")
    names, labels = limits.class_names, m.labels.tolist()
    if names:
        if any(names[label] != name for label, name in zip(labels, m.class_names)):
            i = next(i for i, (label, name) in enumerate(zip(labels, m.class_names)) if names[label] != name)
            _fail(("class_names", i), f"{m.class_names[i][:MAX_NAME_CHARS]!r} is not the name of label {labels[i]}")
    elif any(len(name) > MAX_NAME_CHARS for name in m.class_names):
        _fail(("class_names",), f"a name longer than {MAX_NAME_CHARS} characters")
    if n:  # all at once, in numpy (crop boxes lie inside the frame: their products fit int64)
        heights = (m.crop_boxes[:, 3] - m.crop_boxes[:, 1]).astype(np.int64)
        widths = (m.crop_boxes[:, 2] - m.crop_boxes[:, 0]).astype(np.int64)
        longest = _rle_max_bytes(heights, widths, limits.mask_size)
        lengths = np.fromiter(map(len, m.rle_counts), np.int64, n)
        if (lengths > longest).any() or b"".join(m.rle_counts).translate(None, _RLE_CHARS):
            i = next(i for i, counts in enumerate(m.rle_counts)
                     if lengths[i] > longest[i] or counts.translate(None, _RLE_CHARS))
            _fail(("rle_counts", i), f"not the compressed RLE of a {heights[i]}x{widths[i]} crop")


def _check_end_of_stream(m: EndOfStream, limits: Limits) -> None:
    _check_header(m.header, limits)
    if len(m.error) > MAX_ERROR_CHARS:
        _fail(("error",), f"{len(m.error)} characters, at most {MAX_ERROR_CHARS}")


_RLE_CHARS = bytes(range(48, 48 + 64))  # pycocotools' compressed counts: 6 bits a character, from "0"
_CHECKS: dict[type, Callable[[Any, Limits], None]] = {
    Frame: _check_frame, ModelInput: _check_model_input, RawDetections: _check_raw_detections,
    Detections: _check_detections, EndOfStream: _check_end_of_stream,
}
