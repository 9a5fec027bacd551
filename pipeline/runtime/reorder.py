"""Per-stream order restored after parallel workers, by seq.

offline streams: seq is contiguous (every frame, then EndOfStream at n), so messages are held
until the next expected seq arrives. A frame lost for good (a stage process died holding it)
would hold its stream forever, so the missing seqs are skipped and counted as lost (every
frame is still accounted for, and a subscriber sees the gap) once more than overtake_limit
later messages of the stream are held (more than the pipeline's queues and rings can hold
at once, so no live frame can still be on its way), or, when nothing more arrives (e.g. only
the EndOfStream is held), after gap_timeout_s. Without a dead stage nothing is ever lost:
ZeroMQ PUSH/PULL between living processes does not drop.
live streams: never wait. A message newer than the last one released goes out at once; an
older one (overtaken by a faster worker) is dropped and counted: newest wins, order holds.
Duplicates (a restarted decoder re-sending what was already released) are discarded.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from maskstream.pipeline.runtime.messages import EndOfStream, Message


@dataclass
class StreamOrder:
    live: bool
    next_seq: int = 0
    held: dict[int, Message] = field(default_factory=dict)
    waiting_since: float | None = None  # when the head of the line first went missing
    released: int = 0
    lost: int = 0  # offline: skipped after the gap timeout; live: arrived too late
    duplicates: int = 0
    ended: bool = False
    error: str = ""


class Reorderer:
    def __init__(self, live_streams: dict[str, bool], gap_timeout_s: float, overtake_limit: int):
        self.streams = {sid: StreamOrder(live) for sid, live in live_streams.items()}
        self.gap_timeout_s = gap_timeout_s
        self.overtake_limit = overtake_limit

    def push(self, message: Message, now: float | None = None) -> list[Message]:
        """The messages that can be released now, in order."""
        header = message.header
        stream = self.streams.get(header.stream_id)
        if stream is None:
            raise ValueError(f"stream {header.stream_id!r} is not one of this run's streams {sorted(self.streams)}")
        if stream.ended or header.seq < stream.next_seq:
            if stream.live and not stream.ended:
                stream.lost += 1
            else:
                stream.duplicates += 1
            return []
        if stream.live:
            stream.next_seq = header.seq
            return self._release(stream, message)
        stream.held.setdefault(header.seq, message)
        return self.poll(now, only=stream)

    def poll(self, now: float | None = None, only: StreamOrder | None = None) -> list[Message]:
        """Release what is in order; skip gaps older than the timeout."""
        now = time.monotonic() if now is None else now
        out: list[Message] = []
        for stream in (only,) if only is not None else tuple(self.streams.values()):
            while stream.held:
                message = stream.held.pop(stream.next_seq, None)
                if message is not None:
                    stream.waiting_since = None
                    out += self._release(stream, message)
                    continue
                if stream.waiting_since is None:
                    stream.waiting_since = now
                if now - stream.waiting_since < self.gap_timeout_s and len(stream.held) <= self.overtake_limit:
                    break
                first = min(stream.held)
                stream.lost += first - stream.next_seq
                stream.next_seq, stream.waiting_since = first, None
        return out

    @property
    def holding(self) -> bool:
        return any(s.held for s in self.streams.values())

    def _release(self, stream: StreamOrder, message: Message) -> list[Message]:
        stream.next_seq = message.header.seq + 1
        if isinstance(message, EndOfStream):
            stream.ended, stream.error, stream.held = True, message.error, {}
            stream.next_seq = message.header.seq
        else:
            stream.released += 1
        if stream.lost:
            message = dataclasses.replace(message, header=message.header.with_drops("publish", stream.lost))
        return [message]
