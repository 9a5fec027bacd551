"""infer: `ModelInput` -> `RawDetections`, batching frames across streams up to the runner's batch.

The runner is chosen once, at start (model.runners.make_runner). A partial batch runs once no
frame arrived for batch_timeout_s. Live frames older than staleness_s are dropped here, so
a slow model answers for the newest frames instead of working through a backlog.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from model.runners import RunnerSpec, make_runner
from pipeline.messages import EndOfStream, Message, ModelInput, RawDetections, StreamProgress
from pipeline.stage import Wiring, run_stage


@dataclass(frozen=True)
class InferConfig:
    runner: RunnerSpec
    seed: int = 0  # weights no checkpoint covers (untrained heads) are drawn from it: same run, same outputs
    batch_timeout_s: float = 0.005
    staleness_s: float = 1.0
    live_streams: tuple[str, ...] = ()


class InferStage:
    def __init__(self, config: InferConfig):
        self.config = config
        torch.manual_seed(config.seed)
        self.runner = make_runner(config.runner)
        batch, _, height, width = self.runner.input_shape
        self.images = self.runner.input_buffer()  # the batch, filled in place (page-locked for a GPU)
        # One inference before the stage reports ready (decoders start only then): lazy set-up
        # (allocator, kernel selection; on CUDA the Triton compiles and the CUDA graph capture)
        # would otherwise land on the first frame, a latency spike a live stream pays in drops.
        self.runner.infer(self.images, np.array([[height, width]] * batch, dtype=np.int64))
        self.pending: list[ModelInput] = []
        self.drops: dict[str, int] = {}
        self.frames: dict[str, int] = {}

    @property
    def live_streams(self) -> tuple[str, ...]:
        return self.config.live_streams

    def overtaken(self, message: Message) -> list[Message]:
        """A live frame a newer one of its stream has overtaken in the queue: dropped, counted.
        An end of stream is never dropped (a restarted source's messages may follow it)."""
        if isinstance(message, EndOfStream):
            return self.process(message)
        self.drops[message.header.stream_id] = self.drops.get(message.header.stream_id, 0) + 1
        return []

    @property
    def idle_timeout_s(self) -> float | None:
        return self.config.batch_timeout_s if self.pending else None

    def process(self, message: Message) -> list[Message]:
        if isinstance(message, EndOfStream):  # its drops complete the stream's account
            stream = message.header.stream_id
            header = message.header.with_drops("infer", self.drops[stream]) if stream in self.drops else message.header
            return [*self.flush(), dataclasses.replace(message, header=header)]
        if not isinstance(message, ModelInput):
            raise TypeError(f"expected ModelInput or EndOfStream, got {type(message).__name__}")
        stream = message.header.stream_id
        if stream in self.config.live_streams and message.header.stamps:
            if time.monotonic() - message.header.stamps[0].start > self.config.staleness_s:
                self.drops[stream] = self.drops.get(stream, 0) + 1
                return []
        if message.image.shape != self.images.shape[1:]:
            raise ValueError(f"image: expected uint8 {list(self.images.shape[1:])}, got {list(message.image.shape)}")
        self.images[len(self.pending)] = message.image  # copy out: the ring slot is released after process()
        if stream in self.drops:  # now, not at flush: the count must cover only frames before this one
            message = dataclasses.replace(message, header=message.header.with_drops("infer", self.drops[stream]))
        self.pending.append(message)
        return self.flush() if len(self.pending) == len(self.images) else []

    def flush(self) -> list[Message]:
        if not self.pending:
            return []
        batch, _, height, width = self.images.shape
        sizes = np.array([[height, width]] * batch, dtype=np.int64)  # rows past the pending ones: any valid size
        sizes[: len(self.pending)] = [m.valid_hw for m in self.pending]
        out = self.runner.infer(self.images, sizes)
        results: list[Message] = []
        for i, m in enumerate(self.pending):
            n, stream = int(out["num_detections"][i]), m.header.stream_id
            self.frames[stream] = self.frames.get(stream, 0) + 1
            results.append(RawDetections(m.header, out["boxes"][i, :n], out["scores"][i, :n], out["labels"][i, :n],
                                         out["mask_probs"][i, :n], m.valid_hw, m.frame_hw))
        self.pending = []
        return results

    def progress(self) -> tuple[StreamProgress, ...]:
        return tuple(StreamProgress(s, n, self.drops.get(s, 0)) for s, n in self.frames.items())


def main(config: InferConfig, wiring: Wiring) -> None:
    run_stage(lambda: InferStage(config), wiring)
