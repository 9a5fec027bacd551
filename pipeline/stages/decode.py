"""decode: one process per source; PyAV frames -> `Frame` messages, then one `EndOfStream`.

A broken source ends its own stream with an EndOfStream whose error names it; the other
streams, in their own processes, never notice. seq is the source's frame index (offset by
resume_from after a restart, so a live stream's seq never goes back). A frame's yuv420p planes
are written straight into a shared-memory slot (stage.OutputBuffers) and go as they are, so
sending copies nothing and preprocess converts only the shrunk picture (pipeline.media.pixels).

Every frame is accounted for: header.drops carries, cumulatively, the frames dropped before
this one by the source (live: replaced or stale) and by this stage (live: no room downstream);
the EndOfStream's seq is the number of frames the source produced, and its drops include
the live frames decoded after the last one sent.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from maskstream.pipeline.media.pixels import PLANAR, PixelRoute
from maskstream.pipeline.media.sources import SourceError, SourceSpec, VideoSource
from maskstream.pipeline.runtime.messages import EndOfStream, Frame, Header, Message, StageStamp, StreamProgress
from maskstream.pipeline.runtime.stage import OutputBuffers, Source, Wiring, run_source


@dataclass(frozen=True)
class DecodeConfig:
    stream_id: str
    source: SourceSpec  # policy resolved by the caller, never None here
    # Set by the supervisor on a restart: offline, frames below it were already published (skip
    # them); live, the new connection's frame indices start there.
    resume_from: int = 0
    # A taller or wider frame ends the stream with an error: the next stages refuse it (messages.Limits).
    max_frame_side: int | None = None


INTERRUPTED = "interrupted: the run was asked to stop"  # the error of a stream ended by stop()


class DecodeStage(Source):
    def __init__(self, config: DecodeConfig, buffers: OutputBuffers | None = None):
        self.config = config
        self.buffers = buffers or OutputBuffers()
        self.live = config.source.policy == "live"
        self.sent = self.send_drops = self.source_drops = 0
        self.next_seq = config.resume_from
        self.error = ""
        self.ended = self._stop = False
        self._video: VideoSource | None = None

    def messages(self) -> Iterator[Message]:
        cfg = self.config
        pixels = PixelRoute(lambda shape: self.buffers.array(shape, wait=not self.live))
        source = self._video = VideoSource(cfg.source, convert=pixels)
        if self._stop:
            source.interrupt()
        cut = False  # ended by stop() before the source's end
        try:
            with source:
                for decoded in source:
                    if self._stop:
                        cut = True
                        break
                    rows, width = decoded.image.shape[:2]
                    height = rows * 2 // 3 if pixels.format in PLANAR else rows  # planes: [H * 3 / 2, W]
                    if cfg.max_frame_side is not None and max(height, width) > cfg.max_frame_side:
                        self.error = (f"frames of {width}x{height} are larger than transport.max_frame_side "
                                      f"({cfg.max_frame_side}) allows")
                        break
                    seq = decoded.index + (cfg.resume_from if self.live else 0)
                    self.source_drops += decoded.dropped_before
                    if seq < self.next_seq:  # offline restart: already published
                        continue
                    self.next_seq = seq + 1
                    header = Header(cfg.stream_id, seq, decoded.pts_s,
                                    (StageStamp("source", decoded.decoded_at, decoded.decoded_at),), self._drops())
                    self.sent += 1
                    yield Frame(header, decoded.image, pixels.format)
        except (SourceError, OSError) as exc:
            self.error = str(exc) or type(exc).__name__
        if not self.error and (cut or (self.live and self._stop)):  # a live read ends early when stopped
            self.error = INTERRUPTED
        if self.live:  # frames decoded after the last one taken were dropped by the source
            produced = cfg.resume_from + source.stats.decoded
            self.source_drops += max(0, produced - self.next_seq)
            self.next_seq = max(self.next_seq, produced)
        self.ended = True
        now = time.monotonic()
        yield EndOfStream(Header(cfg.stream_id, self.next_seq, None, (StageStamp("source", now, now),), self._drops()),
                          self.error)

    def _drops(self) -> tuple[tuple[str, int], ...]:
        return (("source", self.source_drops), ("decode", self.send_drops))

    def stop(self) -> None:
        # From a signal handler (SIGUSR1): flags only. A live source waiting for a camera that is
        # away ends its wait too, so the stream's EndOfStream goes out now, not at its next frame.
        self._stop = True
        if self._video is not None:
            self._video.interrupt()

    def dropped(self, message: Message) -> None:
        self.send_drops += 1
        self.sent -= 1

    def progress(self) -> tuple[StreamProgress, ...]:
        return (StreamProgress(self.config.stream_id, self.sent, self.send_drops + self.source_drops,
                               self.next_seq, self.ended, self.error),)


def main(config: DecodeConfig, wiring: Wiring) -> None:
    run_source(lambda buffers: DecodeStage(config, buffers), wiring)
