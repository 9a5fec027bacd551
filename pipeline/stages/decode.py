"""decode: one process per source; PyAV frames -> `Frame` messages, then one `EndOfStream`.

A broken source ends its own stream with an EndOfStream whose error names it; the other
streams, in their own processes, never notice. seq is the source's frame index (offset by
resume_from after a restart, so a live stream's seq never goes back).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.messages import EndOfStream, Frame, Header, Message, StageStamp, StreamProgress
from pipeline.sources import SourceError, SourceSpec, VideoSource
from pipeline.stage import Wiring, run_source


@dataclass(frozen=True)
class DecodeConfig:
    stream_id: str
    source: SourceSpec  # policy resolved by the caller, never None here
    # Set by the supervisor on a restart: offline, frames below it were already published (skip
    # them); live, the new connection's frame indices start there.
    resume_from: int = 0


class DecodeStage:
    def __init__(self, config: DecodeConfig):
        self.config = config
        self.live = config.source.policy == "live"
        self.sent = self.send_drops = self.source_drops = 0
        self.next_seq = config.resume_from
        self.error = ""
        self.ended = self._stop = False

    def messages(self) -> Iterator[Message]:
        cfg = self.config
        try:
            with VideoSource(cfg.source) as source:
                for decoded in source:
                    if self._stop:
                        self.error = "interrupted: the run was asked to stop"
                        break
                    seq = decoded.index + (cfg.resume_from if self.live else 0)
                    self.source_drops += decoded.dropped_before
                    if seq < self.next_seq:  # offline restart: already published
                        continue
                    self.next_seq = seq + 1
                    header = Header(cfg.stream_id, seq, decoded.pts_s, (StageStamp("source", decoded.decoded_at,
                                    decoded.decoded_at),), (("source", self.source_drops), ("decode", self.send_drops)))
                    self.sent += 1
                    yield Frame(header, decoded.image)
        except (SourceError, OSError) as exc:
            self.error = str(exc) or type(exc).__name__
        self.ended = True
        now = time.monotonic()
        yield EndOfStream(Header(cfg.stream_id, self.next_seq, None, (StageStamp("source", now, now),)), self.error)

    def stop(self) -> None:
        self._stop = True

    def dropped(self, message: Message) -> None:
        self.send_drops += 1
        self.sent -= 1

    def progress(self) -> tuple[StreamProgress, ...]:
        return (StreamProgress(self.config.stream_id, self.sent, self.send_drops + self.source_drops,
                               self.next_seq, self.ended, self.error),)


def main(config: DecodeConfig, wiring: Wiring) -> None:
    run_source(lambda: DecodeStage(config), wiring)
