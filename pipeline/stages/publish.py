"""publish: per-stream order restored, then the ZeroMQ PUB output (topic = stream id) and the
offline files (JSONL, COCO results, annotated video), written here so that no message is
lost to PUB/SUB's drop-when-slow (pipeline.media.outputs writes them)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from maskstream.pipeline.media.outputs import AnnotatedVideoWriter, CocoResultsWriter, JsonlWriter
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Header, Message, StreamProgress
from maskstream.pipeline.runtime.reorder import Reorderer
from maskstream.pipeline.runtime.stage import Stage, Wiring, run_stage


@dataclass(frozen=True)
class StreamOutput:
    stream_id: str
    live: bool
    source_url: str
    annotate: Path | None = None  # this stream's annotated video
    max_frames: int | None = None  # the source's max_frames: the annotated video ends there too


@dataclass(frozen=True)
class PublishConfig:
    streams: tuple[StreamOutput, ...]
    jsonl: Path | None = None
    coco: Path | None = None
    gap_timeout_s: float = 300.0
    overtake_limit: int = 256  # see pipeline.runtime.reorder


class PublishStage(Stage):
    def __init__(self, config: PublishConfig):
        live = {s.stream_id: s.live for s in config.streams}
        self.order = Reorderer(live, config.gap_timeout_s, config.overtake_limit)
        index = {s.stream_id: i for i, s in enumerate(config.streams)}
        self.writers: dict[str, list[JsonlWriter | CocoResultsWriter | AnnotatedVideoWriter]] = {}
        shared: list[JsonlWriter | CocoResultsWriter | AnnotatedVideoWriter] = []
        if config.jsonl is not None:
            shared.append(JsonlWriter(config.jsonl))
        if config.coco is not None:  # image ids: seq, with streams numbered apart
            shared.append(CocoResultsWriter(config.coco, image_id_of=lambda h: _image_id(h, index)))
        for s in config.streams:
            own = ([AnnotatedVideoWriter(s.annotate, s.source_url, max_frames=s.max_frames)]
                   if s.annotate is not None else [])
            self.writers[s.stream_id] = [*shared, *own]
        self._all = [*shared, *(w for s in config.streams for w in self.writers[s.stream_id][len(shared):])]

    @property
    def idle_timeout_s(self) -> float | None:
        return 0.2 if self.order.holding else None

    def process(self, message: Message) -> list[Message]:
        if not isinstance(message, (Detections, EndOfStream)):
            raise TypeError(f"expected Detections or EndOfStream, got {type(message).__name__}")
        return self._write(self.order.push(message))

    def flush(self) -> list[Message]:
        return self._write(self.order.poll(time.monotonic()))

    def _write(self, messages: list[Message]) -> list[Message]:
        for message in messages:
            assert isinstance(message, (Detections, EndOfStream))
            for writer in self.writers[message.header.stream_id]:
                writer.write(message)
        return messages

    def progress(self) -> tuple[StreamProgress, ...]:
        return tuple(StreamProgress(sid, s.released, s.lost, s.next_seq, s.ended, s.error)
                     for sid, s in self.order.streams.items())

    def close(self) -> None:
        for writer in self._all:
            writer.close()


def _image_id(header: Header, index: dict[str, int]) -> int:
    return index[header.stream_id] * 10_000_000 + header.seq


def main(config: PublishConfig, wiring: Wiring) -> None:
    run_stage(lambda: PublishStage(config), wiring)
