"""Progress for every long command (run, bench, train, eval), on tqdm.

On a terminal each counter is a tqdm bar (one per stream, or one for training or evaluation):
count, total, rate and ETA, redrawn in place. Elsewhere (a log file, CI, a pipe) the same text
goes out as a timestamped log line every `every_s` seconds and once at the end, so a long run
in a log still says how far it got:

    2026-05-01 12:00:10 INFO maskstream.progress: street: 120/795 frames (15%) [00:20<01:50, 6.10frame/s]
    2026-05-01 12:00:10 INFO maskstream.progress: cam0: 310 frames [00:20, 14.9frame/s, dropped 12, latency 0.21 s]

`RunProgress` is the watcher `maskstream run` and `maskstream bench` hand to the supervisor:
offline streams count frames done against the frame count the source probe found (max_frames
included); live streams have no end, so their line shows frames/s, frames dropped so far and
the mean end-to-end latency since the previous update.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskstream.pipeline.runtime.metrics import MetricsBoard
    from maskstream.pipeline.runtime.supervisor import Supervisor
    from tqdm import tqdm

log = logging.getLogger("maskstream.progress")

_WITH_TOTAL = "{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_WITHOUT_TOTAL = "{desc}: {n_fmt} {unit}s [{elapsed}, {rate_fmt}{postfix}]"


class Progress:
    """Named counters: tqdm bars on a terminal, timestamped log lines every every_s seconds elsewhere.

    tty: draw bars (default: whether `file` is a terminal); enabled False: nothing at all."""

    def __init__(self, enabled: bool = True, every_s: float = 10.0, tty: bool | None = None,
                 file: IO[str] | None = None) -> None:
        self.file = file or sys.stderr
        self.enabled = enabled
        self.tty = self.file.isatty() if tty is None else tty
        self.every_s = every_s
        self.bars: dict[str, tqdm] = {}
        self._sink: IO[str] | None = None
        self._next_log = time.monotonic() + every_s
        self._logged: dict[str, tuple[int, str]] = {}  # key -> (n, postfix) of its last log line

    def set(self, key: str, n: int, total: int | None = None, unit: str = "frame", postfix: str = "") -> None:
        """Counter `key` is at n (of total, when known; fixed when the counter is first seen)."""
        if not self.enabled:
            return
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = self._new(key, total, unit, n)
        if postfix != bar.postfix:
            bar.set_postfix_str(postfix, refresh=False)
        if n != bar.n:
            bar.update(n - bar.n)  # redraws itself at most every mininterval
        if not self.tty and time.monotonic() >= self._next_log:
            self._next_log = time.monotonic() + self.every_s
            self.log_lines()

    def log_lines(self, changed_only: bool = False) -> None:
        for key, bar in self.bars.items():
            state = (bar.n, bar.postfix or "")
            if not changed_only or self._logged.get(key) != state:
                log.info("%s", bar)
                self._logged[key] = state

    def close(self) -> None:
        """Final state: the bars left on screen, or one last log line for each counter that moved
        since its last one (a run that ended just after a periodic line does not repeat it)."""
        if not self.enabled:
            return
        if not self.tty:
            self.log_lines(changed_only=True)
        for bar in self.bars.values():
            bar.close()
        self.bars = {}
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _new(self, key: str, total: int | None, unit: str, initial: int) -> tqdm:
        from tqdm import tqdm

        if self.tty:
            return tqdm(total=total, desc=key, unit=unit, initial=initial, file=self.file, position=len(self.bars),
                        leave=True, dynamic_ncols=True, smoothing=0.1)
        if self._sink is None:
            self._sink = open(os.devnull, "w")  # noqa: SIM115 (closed in close())
        # Not drawn: its text (str(bar)) is logged instead, in a format without a bar.
        return tqdm(total=total, desc=key, unit=unit, initial=initial, file=self._sink, smoothing=0.1,
                    bar_format=_WITH_TOTAL if total else _WITHOUT_TOTAL, mininterval=float("inf"))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RunProgress:
    """A `Supervisor.run` watcher: one counter per stream (see the module docstring).

    totals: frames each offline stream will give (None: unknown, or a live stream); live:
    the ids of the live streams; board: the run's metrics (the source of the latency shown)."""

    def __init__(self, progress: Progress, totals: dict[str, int | None], live: set[str],
                 board: MetricsBoard | None = None, every_s: float = 0.5) -> None:
        self.progress, self.totals, self.live, self.board = progress, totals, live, board
        self.every_s = every_s
        self._next = 0.0
        self._ended = False
        self._latency_seen: dict[str, tuple[float, int]] = {}  # stream -> (sum, count) at the last update
        self._latency: dict[str, float] = {}

    def __call__(self, supervisor: Supervisor, force: bool = False) -> None:
        """Update the counters: at most every every_s seconds, and once every stream has ended (or
        with force: a run that stopped early) to show where they ended."""
        if not self.progress.enabled:
            return
        now = time.monotonic()
        published = supervisor.publish_progress()
        ended = bool(published) and all(p.ended for p in published.values())
        if now < self._next and not force and not (ended and not self._ended):
            return
        self._next, self._ended = now + self.every_s, ended
        self._update_latency()
        for sid in supervisor.stream_ids:
            done = published.get(sid)
            if done is None:
                continue  # nothing published yet: the model is still loading
            drops = sum(q.drops for r in supervisor.latest.values() for q in r.streams if q.stream_id == sid)
            if sid in self.live:
                parts = [f"dropped {drops}"]
                if sid in self._latency:
                    parts.append(f"latency {self._latency[sid]:.2f} s")
                self.progress.set(sid, done.frames, None, postfix=", ".join(parts))
            else:
                self.progress.set(sid, done.next_seq, self.totals.get(sid), postfix=f"lost {drops}" if drops else "")

    def _update_latency(self) -> None:
        """Mean end-to-end latency per live stream over the frames published since the last call."""
        if self.board is None or not self.live:
            return
        from maskstream.pipeline.runtime.metrics import END_TO_END_SECONDS, merge

        for snapshot in merge(self.board.snapshots()):
            for h in snapshot.histograms:
                if h.name != END_TO_END_SECONDS.name or h.stream not in self.live:
                    continue
                total, count = self._latency_seen.get(h.stream, (0.0, 0))
                if h.count > count:
                    self._latency[h.stream] = (h.sum - total) / (h.count - count)
                    self._latency_seen[h.stream] = (h.sum, h.count)
