"""The supervisor: starts the stage processes, watches them, restarts the dead, stops them all.

- Processes are started with multiprocessing's "spawn" context (fork with torch's thread
  pools is unsafe), downstream stages first.
- Every stage sends a `StageReport` every heartbeat; the publish stage's reports say, per
  stream, how far publishing got. The run is over when every stream has ended there.
- A stage process that exits (or stops reporting for heartbeat_timeout_s, then is killed)
  is restarted while the others keep running, up to max_restarts times per stage; a stage
  that fails while starting (e.g. a wrong engine: its last report says why) is not retried.
  A restarted decoder resumes its stream at the first seq not yet published, and publish
  discards what arrives twice; frames lost inside another dead stage are skipped by publish
  after its gap timeout and counted, so every frame is still accounted for.
- A decoder stays after its EndOfStream (a broken source's carries the error) until stopped:
  a ZeroMQ sender that exits loses what its receiver has not read yet.
- SIGINT/SIGTERM: with offline streams still running, decoders are asked to drain (they end
  their streams early with an EndOfStream, frames in flight are finished, files are closed);
  live-only runs, a second signal, or the drain timeout stop everything at once.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maskstream.pipeline.runtime.messages import StageReport, StreamProgress
from maskstream.pipeline.runtime.metrics import MetricsBoard
from maskstream.pipeline.runtime.stage import Wiring
from maskstream.pipeline.runtime.transport import ReportInbox

__all__ = ["RunReport", "StageSpec", "StreamResult", "Supervisor", "SupervisorConfig"]


@dataclass(frozen=True)
class StageSpec:
    main: Callable[[Any, Wiring], None]  # the stage module's main(config, wiring)
    config: Any
    wiring: Wiring
    stream_id: str | None = None  # decoders: the stream they feed

    @property
    def name(self) -> str:
        return self.wiring.stage


@dataclass(frozen=True)
class SupervisorConfig:
    heartbeat_timeout_s: float = 120.0  # a CPU R50 batch can take tens of seconds
    max_restarts: int = 3
    drain_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0
    # All decoders done, yet a stream not ended at publish and nothing moving: its EndOfStream
    # died with a stage. Give up on that stream after this long.
    stall_timeout_s: float = 60.0


@dataclass(frozen=True)
class StreamResult:
    stream_id: str
    frames: int  # published
    lost: int  # skipped by publish (a stage died holding them) or dropped live
    ended: bool
    error: str


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
                 config: SupervisorConfig | None = None, board: MetricsBoard | None = None):
        self.specs = {spec.name: spec for spec in specs}
        self.reports_endpoint = reports
        self.stream_ids = streams
        self.config = config or SupervisorConfig()
        self.board = board
        self.processes: dict[str, multiprocessing.process.BaseProcess] = {}
        self.latest: dict[str, StageReport] = {}
        self.seen_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {name: 0 for name in self.specs}
        self._signals = 0
        self._context = multiprocessing.get_context("spawn")

    # ------------------------------------------------------------------ public

    def publish_progress(self) -> dict[str, StreamProgress]:
        report = self.latest.get("publish.0")
        return {p.stream_id: p for p in report.streams} if report else {}

    def run(self, on_progress: Callable[[Supervisor], None] | None = None) -> RunReport:
        start = time.monotonic()
        inbox = ReportInbox(self.reports_endpoint)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        failure, interrupted = "", False
        drain_deadline: float | None = None
        last_move, last_published = time.monotonic(), -1
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
                elif held and self._inference_ready():
                    for name in held:
                        self._start(name)
                    held = []
                if on_progress is not None:
                    on_progress(self)
                progress = self.publish_progress()
                if self.stream_ids and all(progress.get(s, StreamProgress(s)).ended for s in self.stream_ids):
                    break
                now = time.monotonic()
                if self._signals and not interrupted:
                    interrupted = True
                    if self._any_offline_running():
                        drain_deadline = now + self.config.drain_timeout_s
                        self._drain()
                if self._signals > 1 or (interrupted and drain_deadline is None):
                    break  # stop at once: the finally below terminates every stage
                if drain_deadline is not None and now > drain_deadline:
                    failure = f"drain did not finish within {self.config.drain_timeout_s:.0f} s"
                    break
                failure = self._watch(now)
                if failure:
                    break
                published = sum(p.frames + p.next_seq for p in progress.values())
                if published != last_published:
                    last_published, last_move = published, now
                elif self._decoders_done() and now - last_move > self.config.stall_timeout_s:
                    failure = (f"streams {[s for s in self.stream_ids if not progress.get(s, StreamProgress(s)).ended]}"
                               f" never ended at publish (their EndOfStream was lost with a stage)")
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_all()
            self._collect(inbox, 0.0)
            inbox.close()
        return self._report(failure, interrupted, time.monotonic() - start)

    # ------------------------------------------------------------------ internals

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1

    def _start(self, name: str, config: Any = None) -> None:
        spec = self.specs[name]
        wiring = dataclasses.replace(spec.wiring, parent_pid=os.getpid())
        process = self._context.Process(target=spec.main, args=(config or spec.config, wiring), name=name,
                                        daemon=False)
        process.start()
        self.processes[name] = process
        self.seen_at[name] = time.monotonic()

    def _collect(self, inbox: ReportInbox, timeout_s: float) -> None:
        for report, metrics in inbox.recv_all(timeout_s):
            process = self.processes.get(report.stage)
            if process is None or process.pid != report.pid:
                continue  # a previous life of a restarted stage
            self.latest[report.stage] = report
            self.seen_at[report.stage] = time.monotonic()
            if metrics is not None and self.board is not None:
                self.board.update(metrics)

    def _watch(self, now: float) -> str:
        """Restart dead or silent stages; the reason the run must stop, or ''."""
        for name, process in list(self.processes.items()):
            if process.is_alive():
                if now - self.seen_at[name] > self.config.heartbeat_timeout_s:
                    process.kill()  # hung: the next pass restarts it
                continue
            process.join()
            spec, report = self.specs[name], self.latest.get(name)
            reason = (report.fatal if report and report.fatal and report.pid == process.pid
                      else f"exit code {process.exitcode}")
            if report is not None and report.fatal:
                return f"stage {name} failed: {report.fatal}"
            if self.restarts[name] >= self.config.max_restarts:
                return f"stage {name} failed {self.restarts[name] + 1} times, last: {reason}"
            self.restarts[name] += 1
            self._start(name, self._restart_config(spec))
        return ""

    def _restart_config(self, spec: StageSpec) -> Any:
        if spec.stream_id is None:
            return spec.config
        done = self.publish_progress().get(spec.stream_id)
        return dataclasses.replace(spec.config, resume_from=done.next_seq if done else 0)

    def _decoder_done(self, name: str) -> bool:
        report = self.latest.get(name)
        return report is not None and bool(report.streams) and report.streams[0].ended

    def _decoders_done(self) -> bool:
        return all(self._decoder_done(name) for name, spec in self.specs.items() if spec.stream_id is not None)

    def _any_offline_running(self) -> bool:
        return any(
            spec.stream_id is not None and name in self.processes and not self._decoder_done(name)
            and spec.config.source.policy == "offline"
            for name, spec in self.specs.items()
        )

    def _inference_ready(self) -> bool:
        return any(name.split(".", 1)[0] == "infer" and not report.fatal and not report.starting
                   for name, report in self.latest.items())

    def _drain(self) -> None:
        for name, spec in self.specs.items():
            process = self.processes.get(name)
            if spec.stream_id is not None and process is not None and process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGUSR1)

    def _stop_all(self) -> None:
        # Producers first, publish last: it closes the output files on SIGTERM.
        for name in sorted(self.processes, key=_start_order, reverse=True):
            process = self.processes[name]
            if process.is_alive():
                process.terminate()
                process.join(self.config.stop_timeout_s)
            if process.is_alive():
                process.kill()
                process.join()

    def _report(self, failure: str, interrupted: bool, elapsed: float) -> RunReport:
        progress = self.publish_progress()
        decoders = {spec.stream_id: self.latest.get(name) for name, spec in self.specs.items() if spec.stream_id}
        streams = []
        for sid in self.stream_ids:
            p = progress.get(sid, StreamProgress(sid))
            error = p.error
            if not p.ended and not error:
                decoder = decoders.get(sid)
                error = (decoder.streams[0].error if decoder and decoder.streams else "") or "did not finish"
            # publish's count is frames lost with a dead stage (or overtaken, live); the others dropped theirs live
            dropped = sum(q.drops for name, r in self.latest.items() if not name.startswith("publish")
                          for q in r.streams if q.stream_id == sid)
            streams.append(StreamResult(sid, p.frames, p.drops + dropped, p.ended, error))
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
