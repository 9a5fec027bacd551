"""Small real stages for the supervisor's delivery tests (tests/test_delivery.py): a source that
counts frames (and ends early when asked to drain, as decode does), and an "inference" stage that
makes empty detections and chokes on chosen frames, raising or killing its process each time it
meets one, as a frame that crashes a decoder or a model would. Real processes, sockets and the
real publish stage; no model, so each run is quick. A module of its own: spawn imports it in every stage process."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from maskstream.pipeline.runtime.messages import (
    Detections,
    EndOfStream,
    Frame,
    Header,
    Message,
    StageStamp,
    StreamProgress,
)
from maskstream.pipeline.runtime.stage import Source, Stage, Wiring, run_source, run_stage
from maskstream.pipeline.stages.decode import INTERRUPTED


@dataclass(frozen=True)
class CountConfig:
    stream_id: str
    frames: int
    resume_from: int = 0  # set by the supervisor on a rewind
    seconds_per_frame: float = 0.02


class CountSource(Source):
    live = False

    def __init__(self, config: CountConfig):
        self.config = config
        self.next_seq, self.ended, self.stopped = config.resume_from, False, False

    def messages(self) -> Iterator[Message]:
        sid = self.config.stream_id
        error = ""
        for seq in range(self.config.resume_from, self.config.frames):
            time.sleep(self.config.seconds_per_frame)
            if self.stopped:
                error = INTERRUPTED
                break
            now = time.monotonic()
            self.next_seq = seq + 1
            yield Frame(Header(sid, seq, None, (StageStamp("source", now, now),)), np.zeros((2, 2, 3), np.uint8))
        self.ended = True
        now = time.monotonic()
        yield EndOfStream(Header(sid, self.next_seq, None, (StageStamp("source", now, now),)), error)

    def stop(self) -> None:
        self.stopped = True

    def dropped(self, message: Message) -> None:
        raise AssertionError("an offline source never drops")

    def progress(self) -> tuple[StreamProgress, ...]:
        return (StreamProgress(self.config.stream_id, 0, 0, self.next_seq, self.ended),)


def source_main(config: CountConfig, wiring: Wiring) -> None:
    run_source(lambda buffers: CountSource(config), wiring)


@dataclass(frozen=True)
class ChokeConfig:
    poison: tuple[tuple[str, int], ...]  # (stream, seq) of the frames it chokes on
    # "raise": the frame is lost, reported, the stage goes on; "exit": the process dies; "swallow":
    # the frame is lost the first time, silently (nobody reports it: only the stall clock can tell);
    # "interrupt": the first time (in any life: `marker` remembers), the process sends SIGINT to its
    # parent, the supervisor, and dies, so that the run is interrupted while that frame awaits a rewind
    how: str
    marker: str = ""


class ChokeStage(Stage):
    def __init__(self, config: ChokeConfig):
        self.config = config
        self.swallowed: set[tuple[str, int]] = set()

    def process(self, message: Message) -> Message | None:
        if isinstance(message, EndOfStream):
            return message
        header = message.header
        if (header.stream_id, header.seq) in self.config.poison:
            if self.config.how == "exit":
                os._exit(3)
            if self.config.how == "interrupt" and not os.path.exists(self.config.marker):
                open(self.config.marker, "x").close()
                os.kill(os.getppid(), signal.SIGINT)
                os._exit(3)
            if self.config.how == "raise":
                raise ValueError(f"cannot take frame {header.seq}")
            if (header.stream_id, header.seq) not in self.swallowed:
                self.swallowed.add((header.stream_id, header.seq))
                return None
        empty = np.zeros((0, 4), np.float32)
        return Detections(header, (2, 2), empty, np.zeros(0, np.float32), np.zeros(0, np.int32), (),
                          np.zeros((0, 4), np.int32), ())


def choke_main(config: ChokeConfig, wiring: Wiring) -> None:
    run_stage(lambda: ChokeStage(config), wiring)

