"""publish: per-stream order restored, duplicates discarded, then the journal, the ZeroMQ PUB
output (topic = stream id) and the offline files (COCO results, annotated videos), written here
so that no message is lost to PUB/SUB's drop-when-slow (pipeline.media.outputs writes them).

The journal (docs/delivery.md) is the JSONL every released message is appended to, flushed
before anything else sees it: the run's --out file, or one in the run's folder. A frame is done
once its line is there. The COCO results and the annotated videos are made from the journal's
lines, so that a publish restarted after a crash (`recover`) makes them again from its journal
(the videos re-encoded from their sources up to the resume point) and goes on, appending,
with the same results a run without the crash gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskstream.pipeline.client import from_json
from maskstream.pipeline.media.outputs import (
    AnnotatedVideoWriter,
    CocoResultsWriter,
    JsonlWriter,
)
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
    journal: Path  # the JSONL of every released message: the --out file, or one in the run's folder
    coco: Path | None = None
    # Set by the supervisor on a restart: go on with the journal (and remake the files from it)
    # instead of starting it afresh; skip the offline frames it gave up.
    recover: bool = False
    give_up: tuple[tuple[str, int], ...] = ()


class PublishStage(Stage):
    def __init__(self, config: PublishConfig):
        live = {s.stream_id: s.live for s in config.streams}
        self.order = Reorderer(live, config.give_up)
        index = {s.stream_id: i for i, s in enumerate(config.streams)}
        self.journal = JsonlWriter(config.journal, resume=config.recover)
        self.coco = (CocoResultsWriter(config.coco, image_id_of=lambda h: _image_id(h, index))  # streams numbered apart
                     if config.coco is not None else None)
        self.videos = {s.stream_id: AnnotatedVideoWriter(s.annotate, s.source_url, max_frames=s.max_frames)
                       for s in config.streams if s.annotate is not None}
        for record in self.journal.recovered:
            message = from_json(record)
            self.order.restore(message)
            self._derive(message)
        self.order.resume()

    def process(self, message: Message) -> list[Message]:
        if not isinstance(message, (Detections, EndOfStream)):
            raise TypeError(f"expected Detections or EndOfStream, got {type(message).__name__}")
        released = self.order.push(message)
        for out in released:
            assert isinstance(out, (Detections, EndOfStream))
            record = self.journal.write(out)
            if self.coco is not None or out.header.stream_id in self.videos:
                self._derive(from_json(record))
        return released

    def _derive(self, message: Detections | EndOfStream) -> None:
        """The files made from the journal: from its lines, not the messages, so that a run whose
        publish restarted (and remade them from the journal) writes the same ones."""
        if self.coco is not None:
            self.coco.write(message)
        video = self.videos.get(message.header.stream_id)
        if video is not None:
            video.write(message)

    def progress(self) -> tuple[StreamProgress, ...]:
        return tuple(StreamProgress(sid, s.released, s.lost, s.next_seq, s.ended, s.error)
                     for sid, s in self.order.streams.items())

    def close(self) -> None:
        writers: list[Any] = [self.journal, self.coco, *self.videos.values()]
        for writer in writers:
            if writer is not None:
                writer.close()


def _image_id(header: Header, index: dict[str, int]) -> int:
    return index[header.stream_id] * 10_000_000 + header.seq


def main(config: PublishConfig, wiring: Wiring) -> None:
    run_stage(lambda: PublishStage(config), wiring)
