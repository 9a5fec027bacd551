"""What a pipeline publishes, read back: full-frame masks, the JSON record, sequence tracking.

One torch-free module (numpy, pycocotools, the message types) for everything downstream of
the postprocess stage: the subscriber client (`pipeline.client` re-exports these names), the
output writers (`pipeline.media.outputs`) and the CLI (`maskstream subscribe`, and `maskstream
segment`, whose per-image record is the same `frame_record`). The box-cropped RLE format the
masks travel in, and its codec, is `model.rle`.

    masks(det)            uint8 [N, H, W], one full-frame 0/1 mask per instance
    mask(det, i)          uint8 [H, W] of instance i
    crop_rles(det)        pycocotools RLE objects of the crops, as they travel
    rles(det)             full-frame pycocotools RLE objects, as COCO results want
    frame_record(det)     {"height", "width", "detections": [...]}: the JSON of one frame's instances
    to_json(message)      the JSONL line of a Detections or EndOfStream (docs/schema.md)
    SeqTracker            per-stream seq bookkeeping: gaps (drops), restarts, ends
    SchemaVersionError    a publisher of another wire-schema version (ZeroMQ and NATS readers raise it)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from maskstream.model.rle import paste_box_cropped_rle
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, MessageError

__all__ = [
    "Published",
    "SchemaVersionError",
    "SeqTracker",
    "StreamStats",
    "crop_rles",
    "frame_record",
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
    _paste(det, i, out)
    return out


def masks(det: Detections) -> np.ndarray:
    """Full-frame uint8 0/1 masks [N, H, W] of all instances (N may be 0)."""
    out = np.zeros((len(det.rle_counts), *det.frame_hw), dtype=np.uint8)
    for i in range(len(det.rle_counts)):
        _paste(det, i, out[i])
    return out


def rles(det: Detections) -> list[dict[str, Any]]:
    """Full-frame pycocotools RLE objects ({"size": [H, W], "counts": bytes}), as COCO results want.

    Built by decoding each crop, placing it in the frame and re-encoding: O(H*W) per
    instance, which is fine for writing results, not for a hot loop."""
    out: list[dict[str, Any]] = []
    for i in range(len(det.rle_counts)):
        rle = mask_utils.encode(np.asfortranarray(mask(det, i)))
        out.append({"size": list(rle["size"]), "counts": rle["counts"]})
    return out


def _paste(det: Detections, i: int, out: np.ndarray) -> None:
    where = f"stream {det.header.stream_id!r} seq {det.header.seq} instance {i}"
    if not 0 <= i < len(det.rle_counts):
        raise IndexError(f"{where}: no such instance, the frame has {len(det.rle_counts)}")
    x0, y0, x1, y1 = (int(v) for v in det.crop_boxes[i])
    try:
        paste_box_cropped_rle({"size": [y1 - y0, x1 - x0], "counts": det.rle_counts[i]}, (x0, y0, x1, y1), out)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------- JSON


def frame_record(det: Detections) -> dict[str, Any]:
    """The JSON-able record of one frame's instances: {"height", "width", "detections"}, each
    detection {box, label, class_name, score, mask: {crop_box, rle: {size, counts as str}}}.

    `maskstream segment` writes it per image (with "image" first), `to_json` per Detections
    message (after the header's fields), so one reader reads both."""
    height, width = (int(v) for v in det.frame_hw)
    return {
        "height": height,
        "width": width,
        "detections": [
            {
                "box": [round(float(v), 2) for v in det.boxes[i]],
                "label": int(det.labels[i]),
                "class_name": det.class_names[i],
                "score": round(float(det.scores[i]), 4),
                "mask": {
                    "crop_box": [int(v) for v in det.crop_boxes[i]],
                    "rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                },
            }
            for i, rle in enumerate(crop_rles(det))
        ],
    }


def to_json(message: Published, gap: int | None = None) -> dict[str, Any]:
    """A JSON-able dict of a Detections or EndOfStream message (the JSONL line format):
    the header's fields, "gap" when given, then the EndOfStream's "error" or the frame_record."""
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
    line.update(frame_record(message))
    return line


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
