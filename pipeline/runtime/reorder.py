"""Per-stream order restored after parallel workers, by seq; duplicates discarded (docs/delivery.md).

offline streams: seq is contiguous (every frame, then EndOfStream at n), so messages are held
until the next expected seq arrives, however long that takes: a frame lost with a dead stage is
sent again by a rewind (pipeline.runtime.supervisor), never skipped on a timer. The only frames
skipped are those the supervisor gave up (`give_up`), counted as lost. A message below the next
expected seq, or already held, is a copy a rewind sent again: discarded, counted as a duplicate.
live streams: never wait. A message newer than the last one released goes out at once; an
older one (overtaken by a faster worker) is discarded: newest wins, order holds. Every frame a
live stream skips is accounted for: the drop counts its header carries (each stage's, cumulative)
grew by the frames the stages dropped on purpose, and the rest of the gap, frames lost with a
dead stage, is counted here, so that between two messages a subscriber receives the gap in seq
is the growth of the counts' total.

`restore` replays what the journal already holds after a publish restart, so the stream resumes
where it was (its resume point) with its counts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from maskstream.pipeline.runtime.messages import EndOfStream, Header, Message

PUBLISH = "publish"  # the name publish's own count carries in headers' drops


@dataclass
class StreamOrder:
    live: bool
    give_up: set[int] = field(default_factory=set)  # offline seqs to skip
    next_seq: int = 0  # the resume point: every seq below it was released (or given up, or lost live)
    held: dict[int, Message] = field(default_factory=dict)
    released: int = 0
    lost: int = 0  # offline: given up; live: lost with a dead stage
    duplicates: int = 0  # sent twice (offline) or overtaken (live): discarded
    ended: bool = False
    error: str = ""
    others: int = 0  # live: the sum of the other stages' drop counts on the last message released


class Reorderer:
    def __init__(self, live_streams: dict[str, bool], give_up: tuple[tuple[str, int], ...] = ()):
        self.streams = {sid: StreamOrder(live) for sid, live in live_streams.items()}
        for sid, seq in give_up:
            self._stream(sid).give_up.add(seq)

    def push(self, message: Message) -> list[Message]:
        """The messages that can be released now, in order."""
        header = message.header
        stream = self._stream(header.stream_id)
        if stream.ended or header.seq < stream.next_seq or header.seq in stream.held:
            stream.duplicates += 1
            return []
        if stream.live:
            return self._release(stream, message)
        stream.held[header.seq] = message
        return self._ready(stream)

    def restore(self, message: Message) -> None:
        """A message the journal holds, released before a restart (in the journal's order)."""
        stream = self._stream(message.header.stream_id)
        stream.lost = dict(message.header.drops).get(PUBLISH, stream.lost)
        stream.others = sum(_others(message.header).values())
        self._advance(stream, message)

    def resume(self) -> None:
        """After `restore`: skip what was given up at the resume points."""
        for stream in self.streams.values():
            if not stream.live:
                self._ready(stream)

    @property
    def holding(self) -> int:
        return sum(len(s.held) for s in self.streams.values())

    def _stream(self, stream_id: str) -> StreamOrder:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ValueError(f"stream {stream_id!r} is not one of this run's streams {sorted(self.streams)}")
        return stream

    def _ready(self, stream: StreamOrder) -> list[Message]:
        out: list[Message] = []
        while not stream.ended:
            message = stream.held.pop(stream.next_seq, None)
            if message is not None:
                out += self._release(stream, message)
            elif stream.next_seq in stream.give_up:
                stream.lost += 1
                stream.next_seq += 1
            else:
                break
        return out

    def _release(self, stream: StreamOrder, message: Message) -> list[Message]:
        if stream.live:
            # The frames between the last released and this one that the other stages' counts do not
            # account for were lost: publish counts them. A restarted stage counts from 0 again, so its
            # previous life's drops leave the other counts' sum; counted here instead, the total a
            # subscriber sees never goes back, and every gap is the growth of the total.
            others = sum(_others(message.header).values())
            stream.lost += max(0, message.header.seq - stream.next_seq - (others - stream.others))
            stream.others = others
        self._advance(stream, message)
        if stream.lost:
            message = dataclasses.replace(message, header=message.header.with_drops(PUBLISH, stream.lost))
        return [message]

    def _advance(self, stream: StreamOrder, message: Message) -> None:
        if isinstance(message, EndOfStream):
            stream.ended, stream.error, stream.held = True, message.error, {}
            stream.next_seq = message.header.seq
        else:
            stream.next_seq = message.header.seq + 1
            stream.released += 1


def _others(header: Header) -> dict[str, int]:
    return {name: n for name, n in header.drops if name != PUBLISH}
