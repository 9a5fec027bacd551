"""The supervisor: starts the stage processes, watches them, restarts the dead, sends again what
they lost, stops them all. docs/delivery.md is the protocol it keeps; in short:

- Processes are started with multiprocessing's "spawn" context (fork with torch's thread
  pools is unsafe), downstream stages first, the decoders once inference reports ready.
- Every stage sends a `StageReport` every heartbeat, from a thread of its own (so also while it
  works on one message for long): its counters, what it is working on since when, the frames it
  lost. Publish's say, per stream, how far its journal got (the resume point). The run is over
  when every stream has ended there.
- A stage process that exits, or sends no heartbeat for heartbeat_timeout_s (start_timeout_s
  before its first: a spawned process imports first) and is killed, is restarted while the others
  keep running, up to max_restarts times per stage; a stage that fails while starting (e.g. a
  wrong engine: its last report says why) is not retried. The rings it read in place are
  reclaimed, so that their producers do not wait for slots it will never give back.
- Offline, no frame is lost or doubled: a dead stage (other than a decoder), a frame a stage
  reports lost (unless a rewind already sends it again), or nothing moving for stall_timeout_s
  while work is unfinished (no stage working, no counter changing) *rewinds* the streams
  concerned: their decoders restart at publish's resume point, and publish discards what
  arrives twice. A rewind waits for a report of the publish process alive now. A stream rewound
  more than max_rewinds times in a row at one resume point gives that frame up: publish is
  restarted told to skip it, and the stream's result names it (exit status 1).
- Live, nothing is rewound: a dead stage costs the frames it held, which publish counts as lost.
- Held sources (`hold_sources=True`): every stage but the decoders starts, and the decoders wait
  until `give_sources()` names their sources, so a pipeline can be started and warmed up before
  its source is known (a fleet node's standby, pipeline/fleet/runs.py).
- A decoder stays after its EndOfStream (a broken source's carries the error) until stopped:
  a ZeroMQ sender that exits loses what its receiver has not read yet.
- SIGINT/SIGTERM: decoders are asked to drain (they end their streams early with an EndOfStream,
  frames in flight are finished, files are closed), for up to drain_timeout_s while offline
  streams run (or wait for a rewind), else for up to live_drain_timeout_s (live frames in flight
  take a moment; a camera that is away ends its wait at once); a second signal, or the timeout,
  stops everything at once. Rewinds go on while draining: a frame lost meanwhile (or before) is sent
  again by a decoder started at the resume point and asked to drain at once, so that its stream
  ends there, whole, instead of publish waiting for that frame until the drain timeout.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maskstream.pipeline.runtime.messages import StageReport, StreamProgress
from maskstream.pipeline.runtime.metrics import MetricsBoard
from maskstream.pipeline.runtime.shm_ring import Ring
from maskstream.pipeline.runtime.stage import BlackBox, Wiring
from maskstream.pipeline.runtime.transport import ReportInbox

__all__ = ["UNFINISHED", "RunReport", "StageSpec", "StreamResult", "Supervisor", "SupervisorConfig"]

log = logging.getLogger("maskstream.supervisor")

UNFINISHED = "did not finish"  # the error of a stream whose end never reached publish, for no reason known


@dataclass(frozen=True)
class StageSpec:
    main: Callable[[Any, Wiring], None]  # the stage module's main(config, wiring)
    config: Any  # a decoder's has resume_from; publish's has recover and give_up (set on restarts)
    wiring: Wiring
    stream_id: str | None = None  # decoders: the stream they feed
    offline: bool = False  # decoders: the stream is offline (rewound when frames are lost, drained on SIGINT)
    reads: tuple[str, ...] = ()  # rings whose slots this stage reads in place (reclaimed when it dies)

    @property
    def name(self) -> str:
        return self.wiring.stage


@dataclass(frozen=True)
class SupervisorConfig:
    # No heartbeat at all for this long: hung (killed, restarted). A long forward still beats.
    heartbeat_timeout_s: float = 120.0
    start_timeout_s: float = 300.0  # the same before a process's first heartbeat (spawn imports first)
    max_restarts: int = 3  # per stage
    # Offline: rewinds of a stream in a row at one resume point before that frame is given up.
    max_rewinds: int = 2
    drain_timeout_s: float = 120.0
    # A live-only run asked to stop: this long for its streams' EndOfStreams and the frames in flight
    # to reach the outputs, then everything stops; 0: at once, the streams left without their end.
    live_drain_timeout_s: float = 3.0
    stop_timeout_s: float = 10.0
    # Work unfinished, no stage working and no counter moving for this long: a message was lost where
    # no stage could report it. Offline streams are rewound; a live stream's end is given up.
    stall_timeout_s: float = 60.0


@dataclass(frozen=True)
class StreamResult:
    stream_id: str
    frames: int  # published
    lost: int  # skipped by publish (given up offline, lost with a dead stage live) or dropped live
    ended: bool
    error: str
    rewinds: int = 0  # offline: times its decoder was restarted to send lost frames again


@dataclass(frozen=True)
class RunReport:
    streams: tuple[StreamResult, ...]
    restarts: tuple[tuple[str, int], ...]
    failure: str  # why the run was abandoned; empty when it was not
    interrupted: bool
    elapsed_s: float
    malformed: int
    stage_errors: tuple[str, ...]  # the last error of each stage that had one

    @property
    def failed_streams(self) -> tuple[StreamResult, ...]:
        return tuple(s for s in self.streams if s.error or not s.ended)


class Supervisor:
    def __init__(self, specs: list[StageSpec], reports: str, streams: tuple[str, ...],
                 config: SupervisorConfig | None = None, board: MetricsBoard | None = None,
                 hold_sources: bool = False):
        self.specs = {spec.name: spec for spec in specs}
        self.sources_given = not hold_sources
        self.reports_endpoint = reports
        self.stream_ids = streams
        self.config = config or SupervisorConfig()
        self.board = board
        self.processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self.latest: dict[str, StageReport] = {}
        self.seen_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {name: 0 for name in self.specs}
        self.decoders = {spec.stream_id: name for name, spec in self.specs.items() if spec.stream_id is not None}
        self.offline = {spec.stream_id for spec in specs if spec.stream_id is not None and spec.offline}
        self.publish = next((name for name in self.specs if name.split(".", 1)[0] == "publish"), None)
        # Offline delivery (docs/delivery.md)
        self.rewinds: dict[str, int] = {sid: 0 for sid in streams}
        self.rewound_at: dict[str, float] = {}  # stream -> when its decoder's current life began
        self.pending: dict[str, str] = {}  # streams to rewind once publish reports -> why
        self.pending_since = 0.0  # when the latest of them was asked for
        self.blamed: set[str] = set()  # pending streams whose own frame may have caused it (towards giving up)
        self.stuck: dict[str, tuple[int, int]] = {}  # stream -> (resume point, rewinds there in a row)
        self.given_up: dict[str, list[tuple[int, str]]] = {}  # stream -> (seq, why) of each frame given up
        self.abandoned: dict[str, str] = {}  # stream -> why it can never end at publish
        self.handled: set[tuple[int, str, int, float, str]] = set()  # lost-frame reports acted on
        self.hung: set[str] = set()  # killed for want of heartbeats
        self.boxes: dict[str, BlackBox] = {}  # what each process was working on, readable after its death
        self.configs: dict[str, Any] = {}  # the config each process was started with
        self._rings: dict[str, Ring] = {}
        self._signature: Any = None
        self._last_move = 0.0
        self._signals = 0
        self._drained: set[int] = set()  # pids of the decoders asked to drain
        self._context = multiprocessing.get_context("spawn")

    # ------------------------------------------------------------------ public

    def publish_progress(self) -> dict[str, StreamProgress]:
        report = self.latest.get(self.publish) if self.publish else None
        return {p.stream_id: p for p in report.streams} if report else {}

    def give_sources(self, configs: dict[str, Any]) -> None:
        """The decoders' configs, by stream id, of a supervisor made with hold_sources: its decoders
        start with these once inference is ready (at once when it is already). From on_progress."""
        if set(configs) != set(self.decoders):
            raise ValueError(f"give_sources: expected a config for each of the streams {sorted(self.decoders)}, "
                             f"got {sorted(configs)}")
        for sid, config in configs.items():
            name = self.decoders[sid]
            self.specs[name] = dataclasses.replace(self.specs[name], config=config)
        self.sources_given = True

    def inference_ready(self) -> bool:
        """The inference stage reported ready: its model loaded and warmed up."""
        return any(name.split(".", 1)[0] == "infer" and not report.fatal and not report.starting
                   for name, report in self.latest.items())

    def run(self, on_progress: Callable[[Supervisor], None] | None = None,
            on_stopping: Callable[[Supervisor], None] | None = None) -> RunReport:
        """Run until every stream ended (or the run is abandoned, or stopped). on_progress: called on
        every pass of the loop (every 0.2 s or sooner); on_stopping: called as often while the stages
        are stopped at the end, which waits on each up to stop_timeout_s (a sign of life for whoever
        watches this process: a fleet node's pipeline, pipeline/fleet/runs.py)."""
        start = time.monotonic()
        inbox = ReportInbox(self.reports_endpoint)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        failure, interrupted = "", False
        drain_deadline: float | None = None
        live_only = False  # draining live streams only (live_drain_timeout_s)
        # Decoders start once inference is ready (its first report not marked `starting` comes
        # after the model is loaded and warmed up): a live source started earlier would only drop
        # the frames of the warm-up.
        held = [name for name in self.specs if self.specs[name].stream_id is not None]
        try:
            for name in sorted(self.specs, key=_start_order):
                if name not in held:
                    self._start(name)
            while True:
                self._collect(inbox, 0.2)
                if held and self._signals:
                    held = []  # interrupted before any source opened: nothing to drain
                elif held and self.sources_given and self.inference_ready():
                    for name in held:
                        self._start(name)
                    held = []
                if on_progress is not None:
                    on_progress(self)
                if self._finished():
                    break
                now = time.monotonic()
                if self._signals and not interrupted:
                    interrupted = True
                    if self._any_offline_running() or self.offline & self.pending.keys():
                        drain_deadline = now + self.config.drain_timeout_s
                    elif self.config.live_drain_timeout_s > 0 and self._any_decoder_running():
                        drain_deadline, live_only = now + self.config.live_drain_timeout_s, True
                if drain_deadline is not None:
                    self._drain()  # each decoder once, those a rewind starts while draining too
                if self._signals > 1 or (interrupted and drain_deadline is None):
                    break  # stop at once: the finally below terminates every stage
                if drain_deadline is not None and now > drain_deadline:
                    if not live_only:  # live streams left without their end are only stopped
                        failure = f"drain did not finish within {self.config.drain_timeout_s:.0f} s"
                    break
                failure = self._watch(now)
                if failure:
                    break
                self._note_lost_frames()
                self._watch_stall(now, sources_started=not held)
                self._rewind()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_all(on_stopping)
            finished = self.processes.get(self.publish) if self.publish else None
            if finished is not None and finished.exitcode != 0 and not failure:
                # Its files are made when it closes: killed or failed then, they may be incomplete.
                failure = f"stage {self.publish} did not finish its outputs (exit code {finished.exitcode})"
            self._collect(inbox, 0.0)
            inbox.close()
            for ring in self._rings.values():
                ring.close()
        return self._report(failure, interrupted, time.monotonic() - start)

    # ------------------------------------------------------------------ processes

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1

    def _start(self, name: str, config: Any = None) -> None:
        spec = self.specs[name]
        self.boxes[name] = BlackBox(self._context)
        self.configs[name] = config or spec.config
        wiring = dataclasses.replace(spec.wiring, parent_pid=os.getpid(), blackbox=self.boxes[name])
        process = self._context.Process(target=spec.main, args=(config or spec.config, wiring), name=name,
                                        daemon=False)
        if spec.stream_id is not None:
            # Every frame this decoder life makes is stamped later than this (docs/delivery.md).
            self.rewound_at[spec.stream_id] = time.monotonic()
        process.start()
        self.processes[name] = process
        self.seen_at[name] = time.monotonic()

    def _stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join()

    def _collect(self, inbox: ReportInbox, timeout_s: float) -> None:
        for report, metrics in inbox.recv_all(timeout_s):
            process = self.processes.get(report.stage)
            if process is None or process.pid != report.pid:
                continue  # a previous life of a restarted stage
            self.latest[report.stage] = report
            self.seen_at[report.stage] = time.monotonic()
            if metrics is not None and self.board is not None:
                self.board.update(metrics)

    def _current(self, name: str | None) -> StageReport | None:
        """The latest report of the process running as `name` now (None before its first)."""
        process = self.processes.get(name) if name is not None else None
        report = self.latest.get(name) if name is not None else None
        return report if process is not None and report is not None and report.pid == process.pid else None

    def _watch(self, now: float) -> str:
        """Restart dead or silent stages; the reason the run must stop, or ''."""
        for name, process in list(self.processes.items()):
            if process.is_alive():
                current = self._current(name) is not None
                limit = self.config.heartbeat_timeout_s if current else max(self.config.start_timeout_s,
                                                                            self.config.heartbeat_timeout_s)
                if now - self.seen_at[name] > limit:
                    log.warning("stage %s sent no heartbeat for %.0f s: killed", name, limit)
                    self.hung.add(name)
                    process.kill()  # hung: the next pass restarts it
                continue
            process.join()
            report = self._current(name)
            if report is not None and report.fatal:
                return f"stage {name} failed: {report.fatal}"
            reason = (f"killed: no heartbeat for {self.config.heartbeat_timeout_s:.0f} s" if name in self.hung
                      else f"exit code {process.exitcode}")
            self.hung.discard(name)
            if self.restarts[name] >= self.config.max_restarts:
                return f"stage {name} failed {self.restarts[name] + 1} times, last: {reason}"
            self.restarts[name] += 1
            log.warning("stage %s died (%s): restarting it", name, reason)
            spec = self.specs[name]
            culprit = self.boxes[name].read()  # a decoder's: the last frame it made
            doing = "after making" if spec.stream_id is not None else "working on"
            died = f"{name} died ({reason})" + (f" {doing} {culprit[0]}#{culprit[1]}" if culprit else "")
            if spec.stream_id is not None and spec.offline:
                del self.processes[name]  # the rewind starts it again, at publish's resume point
                self._lose([spec.stream_id], died)
            elif spec.stream_id is not None:
                self._start(name, dataclasses.replace(spec.config, resume_from=self._live_resume(name, culprit)))
            else:
                self._reclaim(spec.reads)
                self._start(name, self._publish_config() if name == self.publish else spec.config)
                # Every stream is sent again; only the frame it died on (if any) counts towards giving up.
                self._lose(sorted(self.offline), died, blame=[culprit[0]] if culprit else None)
        return ""

    def _live_resume(self, name: str, made: tuple[str, int, float] | None) -> int:
        """Where a live decoder started again numbers its frames from: after every frame the dead one
        made (`made`: its black box) and publish saw, so that no seq is made twice (nor its drops
        counted twice: docs/delivery.md, Live)."""
        spec = self.specs[name]
        assert spec.stream_id is not None
        done = self.publish_progress().get(spec.stream_id)
        return max(done.next_seq if done else 0, made[1] + 1 if made else 0, self.configs[name].resume_from)

    def _reclaim(self, rings: tuple[str, ...]) -> None:
        """Free the slots of rings a dead stage read: what it held (and what was queued for it) is
        lost, and a slot still in use by a living reader is caught there (docs/delivery.md)."""
        for name in rings:
            ring = self._rings.get(name)
            if ring is None:
                try:
                    ring = self._rings[name] = Ring.attach(name)
                except ValueError:
                    continue  # the run's rings are made before any stage; gone only in tests without them
            ring.reclaim_all()

    def _publish_config(self) -> Any:
        """A restarted publish recovers its journal and skips every frame given up so far."""
        assert self.publish is not None
        give_up = tuple((sid, seq) for sid, frames in self.given_up.items() for seq, _ in frames)
        return dataclasses.replace(self.specs[self.publish].config, recover=True, give_up=give_up)

    # ------------------------------------------------------------------ offline delivery

    def _lose(self, streams: list[str], why: str, blame: list[str] | None = None) -> None:
        """Frames of these streams may have been lost: rewind the offline ones not yet ended. `blame`:
        the streams whose own frame may have caused it (None: all of them), for which the rewind is a
        step towards giving that frame up."""
        progress = self.publish_progress()
        for sid in streams:
            if sid in self.offline and sid not in self.abandoned and not progress.get(sid, StreamProgress(sid)).ended:
                self.pending.setdefault(sid, why)
                self.pending_since = time.monotonic()
                if blame is None or sid in blame:
                    self.blamed.add(sid)

    def _note_lost_frames(self) -> None:
        progress = self.publish_progress()
        for report in self.latest.values():
            for lost in report.lost:
                key = (report.pid, lost.stream_id, lost.seq, lost.decoded_at, lost.reason)
                if key in self.handled:
                    continue
                self.handled.add(key)
                done = progress.get(lost.stream_id, StreamProgress(lost.stream_id))
                if lost.decoded_at < self.rewound_at.get(lost.stream_id, math.inf):
                    continue  # made by an earlier life of its decoder: the rewind since sends it again
                if done.ended or lost.seq < done.next_seq:
                    continue  # a copy of a frame published already
                self._lose([lost.stream_id], f"frame {lost.seq} lost by {lost.reason}")

    def _watch_stall(self, now: float, sources_started: bool) -> None:
        """The stall clock runs only while there is unfinished work and nothing works on it: no
        stage starting or working, no counter moving, no rewind waiting. Slow is not stalled."""
        progress = self.publish_progress()
        unfinished = [sid for sid in self.stream_ids
                      if not progress.get(sid, StreamProgress(sid)).ended and sid not in self.abandoned]
        reports = {name: self._current(name) for name in self.processes}
        signature = (tuple((name, r.pid, r.received, r.sent, r.errors, r.malformed)
                           for name, r in sorted(self.latest.items())),
                     tuple((p.stream_id, p.frames, p.next_seq) for p in progress.values()))
        busy = bool(self.pending) or any(r is None or r.starting or r.working_since for r in reports.values())
        if not sources_started or not unfinished or busy or signature != self._signature:
            self._signature, self._last_move = signature, now
            return
        if now - self._last_move < self.config.stall_timeout_s:
            return
        self._last_move = now
        why = f"nothing moved for {self.config.stall_timeout_s:.0f} s"
        log.warning("%s with streams %s unfinished: rewinding them", why, unfinished)
        self._lose(unfinished, why)
        for sid in unfinished:
            if sid not in self.offline and self._decoder_end(sid) is not None:
                self.abandoned[sid] = (f"its EndOfStream was lost with a stage ({why}; a live stream is not "
                                       "sent again)")

    def _decoder_end(self, sid: str) -> int | None:
        """The seq of the stream's EndOfStream once its current decoder has sent it."""
        # Any life's report will do: the number of frames is the source's.
        name = self.decoders.get(sid)
        report = self.latest.get(name) if name is not None else None
        if report is not None and report.streams and report.streams[0].ended:
            return report.streams[0].next_seq
        return None

    def _rewind(self) -> None:
        """Restart the pending streams' decoders at publish's resume point, once the publish process
        alive now has reported how far it got since they were asked for (a restarted one recovers its
        journal first; a resume point older than needed would only send more frames twice); or give a
        frame up."""
        if not self.pending:
            return
        report = self._current(self.publish)
        if report is None or report.starting or report.sent_at < self.pending_since:
            return
        progress = {p.stream_id: p for p in report.streams}
        plan: dict[str, tuple[int, str]] = {}
        give_up: list[str] = []
        for sid, why in sorted(self.pending.items()):
            done = progress.get(sid, StreamProgress(sid))
            if done.ended:
                continue
            at, count = self.stuck.get(sid, (-1, 0))
            if sid in self.blamed:
                count = count + 1 if at == done.next_seq else 1
            else:  # not this stream's doing: no step towards giving its frame up
                count = count if at == done.next_seq else 0
            self.stuck[sid] = (done.next_seq, count)
            if count <= self.config.max_rewinds:
                plan[sid] = (done.next_seq, why)
                continue
            end = self._decoder_end(sid)
            if end is not None and done.next_seq >= end:
                self.abandoned[sid] = f"its EndOfStream never reached publish in {count - 1} rewinds (last: {why})"
                continue
            self.given_up.setdefault(sid, []).append((done.next_seq, f"after {count - 1} rewinds, last: {why}"))
            give_up.append(sid)
        self.pending.clear()
        self.blamed.clear()
        if give_up:
            # Publish learns what to skip only through its config: restarted, it recovers its journal,
            # and everything it held or had queued is sent again.
            log.warning("giving up frame(s) %s", ", ".join(f"{sid}#{self.given_up[sid][-1][0]}" for sid in give_up))
            assert self.publish is not None
            self._stop(self.publish)
            self._start(self.publish, self._publish_config())
            self._lose(sorted(self.offline), "publish restarted to give a frame up", blame=[])
            return
        for sid, (resume, why) in plan.items():
            log.info("rewinding stream %s to frame %d (%s)", sid, resume, why)
            name = self.decoders[sid]
            self._stop(name)
            self._start(name, dataclasses.replace(self.specs[name].config, resume_from=resume))
            self.rewinds[sid] += 1

    # ------------------------------------------------------------------ state

    def _finished(self) -> bool:
        """Every stream ended at publish, as the publish process alive now says (one that died after
        saying so has not closed its files: restarted, it makes them again from its journal)."""
        report = self._current(self.publish)
        progress = {p.stream_id: p for p in report.streams} if report is not None else {}
        return bool(self.stream_ids) and all(progress.get(s, StreamProgress(s)).ended or s in self.abandoned
                                             for s in self.stream_ids)

    def _decoder_done(self, name: str) -> bool:
        report = self.latest.get(name)
        return report is not None and bool(report.streams) and report.streams[0].ended

    def _any_decoder_running(self) -> bool:
        return any(spec.stream_id is not None and name in self.processes and not self._decoder_done(name)
                   for name, spec in self.specs.items())

    def _any_offline_running(self) -> bool:
        return any(spec.offline and name in self.processes and not self._decoder_done(name)
                   for name, spec in self.specs.items())

    def _drain(self) -> None:
        """Ask every decoder process to end its stream (SIGUSR1), once each, as soon as it has made its
        source: its first report not marked `starting` comes after its handler is installed (before
        that, SIGUSR1 would kill it)."""
        for name, spec in self.specs.items():
            process = self.processes.get(name)
            report = self._current(name)
            if (spec.stream_id is None or process is None or not process.is_alive() or not process.pid
                    or process.pid in self._drained or report is None or report.starting):
                continue
            self._drained.add(process.pid)
            os.kill(process.pid, signal.SIGUSR1)

    def _stop_all(self, on_stopping: Callable[[Supervisor], None] | None = None) -> None:
        # Producers first, publish last: it closes the output files on SIGTERM.
        for name in sorted(self.processes, key=_start_order, reverse=True):
            process = self.processes[name]
            if process.is_alive():
                process.terminate()
                deadline = time.monotonic() + self.config.stop_timeout_s
                while process.is_alive() and time.monotonic() < deadline:
                    process.join(min(0.2, max(0.0, deadline - time.monotonic())))
                    if on_stopping is not None:
                        on_stopping(self)
            if process.is_alive():
                process.kill()
                process.join()

    def _report(self, failure: str, interrupted: bool, elapsed: float) -> RunReport:
        progress = self.publish_progress()
        decoders = {spec.stream_id: self.latest.get(name) for name, spec in self.specs.items() if spec.stream_id}
        streams = []
        for sid in self.stream_ids:
            p = progress.get(sid, StreamProgress(sid))
            given_up = tuple(f"frame {seq} given up ({why})" for seq, why in self.given_up.get(sid, ()))
            error = "; ".join(e for e in (self.abandoned.get(sid, ""), *given_up, p.error) if e)
            if not p.ended and not error:
                decoder = decoders.get(sid)
                error = (decoder.streams[0].error if decoder and decoder.streams else "") or UNFINISHED
            # Once a stream ended, publish has every seq below its end either published or counted: that
            # count is exact, where the stages' reports miss what a killed stage dropped since its last one.
            # Before: publish's count (frames given up, or lost with a dead stage, live) and the drops the
            # other stages reported.
            lost = p.next_seq - p.frames if p.ended else p.drops + sum(
                q.drops for name, r in self.latest.items() if not name.startswith("publish")
                for q in r.streams if q.stream_id == sid)
            streams.append(StreamResult(sid, p.frames, lost, p.ended, error, self.rewinds.get(sid, 0)))
        errors = tuple(r.last_error for r in self.latest.values() if r.last_error)
        return RunReport(tuple(streams), tuple((n, c) for n, c in self.restarts.items() if c), failure, interrupted,
                         elapsed, sum(r.malformed for r in self.latest.values()), errors)


def _start_order(name: str) -> int:
    order = ("publish", "postprocess", "infer", "preprocess", "decode")
    kind = name.split(".", 1)[0]
    return order.index(kind) if kind in order else len(order)


class SteadyRate:
    """A `Supervisor.run` watcher: frames/s from the first published frame to the last, what the
    pipeline sustains once started, without the start-up (process spawn, model load, warm-up)."""

    def __init__(self) -> None:
        self.first_at = self.last_at = 0.0
        self.first_frames = self.published = 0

    def update(self, supervisor: Supervisor) -> None:
        done = sum(p.frames for p in supervisor.publish_progress().values())
        if done != self.published:
            now = time.monotonic()
            if not self.first_frames:
                self.first_at, self.first_frames = now, done
            self.published, self.last_at = done, now

    @property
    def frames(self) -> int:
        """Frames published after the first one(s) seen, over `seconds`."""
        return self.published - self.first_frames

    @property
    def seconds(self) -> float:
        return self.last_at - self.first_at

    def describe(self) -> str:
        if self.frames < 2:
            return ""
        return f", {self.frames / self.seconds:.2f} frames/s after the first"
