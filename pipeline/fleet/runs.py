"""One camera or one job on a node: a local staged pipeline in a process of its own, its results
forwarded to NATS.

A run is `maskstream run`'s public path: `run_config.plan(cfg)` and `Supervisor(...).run(...)`
in a child process, over one source, with its ZeroMQ PUB output on an ipc:// socket of the node.
A thread of the node reads that socket with `pipeline.client.Subscriber` and publishes every
Detections / EndOfStream through `ResultPublisher`, under the results' stream id (the camera's
name, the job's id) instead of the source's file stem.

Why a process per run: a Supervisor's streams are fixed when it starts, and it owns its
process's SIGINT/SIGTERM handlers (so one per process, in the main thread). Runs start, stop and
fail apart from each other, and the node stays a small process that the pipelines cannot take
down. docs/fleet.md says what it costs.

Cameras (`kind="camera"`) are published with an epoch (the lease revision, and a restart
count), since every run of a camera counts seq from 0 again; seq gaps are the frames the
pipeline dropped, which the headers' drops count. A camera stopped by the node (removed, moved,
the node draining) gets an EndOfStream from the node: seq one past the last frame published,
the last frame's drops, the error naming why.

Jobs (`kind="job"`) are published without an epoch: a re-run's message ids equal the earlier
attempt's, so the results stream stores each frame once. A job resumes after `skip_through`,
the last seq an earlier attempt stored, and publishes only an unbroken run of seqs after it: a
frame missing (lost in the pipeline) ends the attempt before anything past the hole is stored,
so the stored results are always a prefix of the job's, in order. Each is stored only after the
result the attempt last knew stored (`stored_through`, ResultPublisher's `after`): an attempt a
later one replaced stores nothing more, and its hand-back acknowledges nothing. The job is acknowledged
(`Job.done`) once its EndOfStream is stored; a source that failed (the EndOfStream carries the
error) fails it for good; anything else (a hole, the pipeline's death, NATS not storing,
`stop()`) hands it back for another delivery, from the node's thread, so the main loop never
waits on an acknowledgement.

The pipeline process sends the node a status message at least every PROGRESS_EVERY_S from its
Supervisor's loop (with the stages' new errors); the node counts each run's and standby's
silence (`Silence`) and SIGKILLs one silent too long, with its stage processes (its process
group: `kill_hung`, `Spare.kill`): a hung run then ends as on any pipeline's death.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Literal

from maskstream.pipeline import logs
from maskstream.pipeline.client import Subscriber
from maskstream.pipeline.fleet.connection import FleetError
from maskstream.pipeline.fleet.jobs import Job
from maskstream.pipeline.fleet.results import Published, ResultPublisher
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Header, MessageError
from maskstream.pipeline.runtime.titles import name_process

if TYPE_CHECKING:
    from maskstream.pipeline.run_config import ChosenModel, RunConfig

__all__ = ["PipelineRun", "RunSpec", "RunStatus", "Silence", "Spare", "standby_config"]

log = logging.getLogger(__name__)

LIVE_HWM = 1000  # a camera's results queued at the node while NATS is slow; past it they show as drops
RATE_WINDOW_S = 5.0  # frames/s over the last few seconds
EXITED_QUIET_S = 2.0  # after the pipeline exited, results still on their way get this long to arrive
PROGRESS_EVERY_S = 1.0  # the pipeline process's status messages: at least this often from its Supervisor loop


class Silence:
    """How long a pipeline process has said nothing, on the node's loop clock.

    The process sends a status message at least every PROGRESS_EVERY_S from its Supervisor's loop
    (`pipeline_process`), also while its stages start, its model loads and its stages stop at the
    end; the node reads them every turn of its loop. Its loop clock advances each turn by no more
    than a turn's worth, however late the turn: a node that was itself held up (an overloaded or
    frozen host, where its pipelines were held up with it) does not take that time for their
    silence. `silent_s` must be asked every turn to count in full."""

    def __init__(self) -> None:
        self.heard = 0  # status messages read (0: the process is still in its start)
        self._counted = -1
        self._since = 0.0  # the loop clock when `heard` last changed (or the first ask)

    def hear(self) -> None:
        self.heard += 1

    def silent_s(self, clock: float) -> float:
        """Loop-clock seconds since the last status message read; before the first, since the first ask."""
        if self.heard != self._counted:
            self._counted, self._since = self.heard, clock
        return clock - self._since


@dataclass(frozen=True)
class RunSpec:
    kind: Literal["camera", "job"]
    stream_id: str  # the results' stream id: the camera's name or the job's id
    config: RunConfig  # one source; outputs.publish is the node's ipc:// endpoint for this run
    epoch: str = ""  # cameras: the lease revision (and restart count)
    skip_through: int | None = None  # jobs: the last seq an earlier attempt stored
    log_level: str = "warning"  # the stage processes' (pipeline.logs)
    model: ChosenModel | None = None  # run_config.choose_model(config.model), when the node has it already
    stored_through: int = 0  # jobs: the results stream's sequence of that result (0: none stored)

    @property
    def title(self) -> str:
        """How its pipeline process shows in `ps -f`: "maskstream: pipeline camera door"."""
        return f"{self.kind} {self.stream_id}"

    @property
    def endpoint(self) -> str:
        endpoint = self.config.outputs.publish
        assert endpoint is not None
        return endpoint


@dataclass(frozen=True)
class RunStatus:
    frames: int  # Detections published by this run
    results: int  # everything published (an EndOfStream too)
    drops: int  # frames the pipeline dropped (the latest header's count)
    frames_per_s: float
    last_error: str


class PipelineRun:
    """A pipeline process and its forwarding thread. start(); poll() from the node's loop until
    finished; stop(reason) at any time (returns at once)."""

    def __init__(self, spec: RunSpec, publisher: ResultPublisher, job: Job | None = None,
                 stop_timeout_s: float = 20.0) -> None:
        if (spec.kind == "job") != (job is not None):
            raise ValueError("a job run needs its Job, a camera run none")
        self.spec = spec
        self.publisher = publisher
        self.job = job
        self.stop_timeout_s = stop_timeout_s
        # how it ended: a camera "ended" (its EndOfStream stored), "stopped" or "failed"; a job "done",
        # "failed", "released" (handed back), "unacknowledged" or "superseded" (a later attempt holds the job)
        self.outcome = ""
        self.started_at = time.monotonic()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._hung = ""  # why the node SIGKILLed the pipeline as hung
        self._end_stream = False
        self._stop_sent_at: float | None = None
        self._signals_sent = 0
        self._lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._frames = 0
        self._results = 0
        self._drops = 0
        self._next_seq = 0 if spec.skip_through is None else spec.skip_through + 1
        self._frames_total: int | None = None  # a job's input's frame count, as its pipeline found it
        self._stored_through = spec.stored_through  # jobs: publishes store only after it (ResultPublisher)
        self._last_header: Header | None = None
        self._times: deque[float] = deque()
        self._errors: list[str] = []
        self._report: tuple[str, ...] | None = None  # the pipeline's own last words (failure, stream errors)
        self._end: EndOfStream | None = None  # the stream's EndOfStream, once stored
        self._ended_at: float | None = None
        self.silence = Silence()  # the pipeline process's (a standby's, when the run takes one over)

    # ------------------------------------------------------------------ the node's side

    def start(self, spare: Spare | None = None) -> None:
        """Start forwarding, then the pipeline: in `spare` (a process started ahead) or a new one."""
        self._thread = threading.Thread(target=self._forward, name=f"forward-{self.spec.stream_id}", daemon=True)
        self._thread.start()
        self._ready.wait(10)  # the SUB socket connects before the pipeline can publish anything
        spare = spare if spare is not None and spare.alive else Spare()
        spare.give(self.spec)
        self._process, self._conn, self.silence = spare.process, spare.status, spare.silence

    def stop(self, reason: str, end_stream: bool = False) -> None:
        """Stop forwarding now and the pipeline soon. end_stream: a camera's results end with an
        EndOfStream saying `reason` (a camera moved away or removed); a job is handed back."""
        if self._stop.is_set():
            return
        self._stop_reason, self._end_stream = reason, end_stream
        self._stop.set()
        self._signal_process()

    def poll(self) -> bool:
        """Read the pipeline's status, see that a stopped one exits; True once it is all over."""
        self._read_status()
        process = self._process
        if process is None:
            return False
        alive = process.is_alive()
        forwarding = self._thread is not None and self._thread.is_alive()
        if alive and not forwarding and not self._stop.is_set():
            with self._lock:
                ended = self._end is not None
            # after its EndOfStream a pipeline exits by itself; one whose results could not be
            # forwarded is of no more use
            if not ended or time.monotonic() - (self._ended_at or 0.0) > self.stop_timeout_s:
                self._stop.set()
        if alive and self._stop.is_set():
            self._signal_process()
        if not alive:
            process.join()
            self._read_status()
        return not alive and not forwarding

    @property
    def exitcode(self) -> int | None:
        """The pipeline process's exit code once it exited (negative: the signal that killed it), else None."""
        return self._process.exitcode if self._process is not None else None

    @property
    def forwarding(self) -> bool:
        """The thread still forwards (or ends the stream, or acknowledges the job)."""
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> RunStatus:
        now = time.monotonic()
        with self._lock:
            while self._times and now - self._times[0] > RATE_WINDOW_S:
                self._times.popleft()
            times = list(self._times)
            rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
            return RunStatus(self._frames, self._results, self._drops, rate, self._errors[-1] if self._errors else "")

    def job_progress(self) -> tuple[int, int | None, float]:
        """A job's frames stored (earlier attempts' included), its input's frame count (None until
        known) and this run's frames/s."""
        rate = self.status().frames_per_s
        with self._lock:
            return self._next_seq, self._frames_total, rate

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def hung(self, clock: float, timeout_s: float) -> str:
        """Why the pipeline process is taken for hung, "" while it is not: said nothing for timeout_s
        of the node's loop clock (Silence, read by poll()), or, before its first status message
        (imports, plan, its stages' start), for its supervisor's own allowance for a process's
        start (supervisor.start_timeout_s). Never one that exited, was asked to stop (it exits, or
        is SIGKILLed stop_timeout_s later), whose EndOfStream was stored (it exits by itself, see
        poll()), or that was killed as hung already."""
        process = self._process
        if process is None or self._stop.is_set() or self._hung or not process.is_alive():
            return ""
        with self._lock:
            if self._end is not None:
                return ""
        silent = self.silence.silent_s(clock)
        if self.silence.heard:
            return f"the pipeline sent nothing for {silent:.0f} s: hung" if silent > timeout_s else ""
        allowance = self.spec.config.supervisor.start_timeout_s
        return f"the pipeline did not start within {allowance:.0f} s: hung" if silent > allowance else ""

    def kill_hung(self, why: str) -> None:
        """SIGKILL a hung pipeline and its stage processes, without waiting: the run then ends as on
        any pipeline's death (a camera's run fails, a job is handed back), its error `why`."""
        self._hung = why
        if self._process is not None:
            kill_group(self._process)

    def kill(self) -> None:
        """SIGKILL the pipeline process and its stage processes, and wait for it."""
        if self._process is not None:
            kill_group(self._process)
            self._process.join(5)

    # ------------------------------------------------------------------ internals (node)

    def _signal_process(self) -> None:
        """SIGTERM, again a second later (the Supervisor stops at once on a second signal), SIGKILL
        once stop_timeout_s has passed."""
        process = self._process
        if process is None or not process.is_alive() or process.pid is None:
            return
        now = time.monotonic()
        if self._stop_sent_at is None:
            self._stop_sent_at = now
        elif now - self._stop_sent_at > self.stop_timeout_s:
            log.warning("run %s: the pipeline did not stop in %s s; killing it", self.spec.stream_id,
                        self.stop_timeout_s)
            kill_group(process)
            return
        if self._signals_sent < 1 + int(now - self._stop_sent_at):
            self._signals_sent += 1
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _read_status(self) -> None:
        with self._conn_lock:  # the node's loop and the forwarding thread both read it
            self._read_status_locked()

    def _read_status_locked(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                kind, payload = conn.recv()
                self.silence.hear()
                if kind == "status":
                    for error in payload:
                        self._error(error)
                elif kind == "frames":
                    with self._lock:
                        self._frames_total = int(payload[0])
                elif kind == "report":
                    self._report = tuple(payload)
                    for error in payload:
                        self._error(error)
        except (EOFError, OSError):
            conn.close()
            self._conn = None

    def _error(self, text: str) -> None:
        with self._lock:
            if text and (not self._errors or self._errors[-1] != text):
                self._errors.append(text)
                del self._errors[:-20]

    # ------------------------------------------------------------------ the forwarding thread

    def _forward(self) -> None:
        reason = ""
        try:
            hwm = 0 if self.spec.kind == "job" else LIVE_HWM  # 0: no limit, a job's result is never dropped here
            with Subscriber(self.spec.endpoint, high_water_mark=hwm) as sub:
                self._ready.set()
                reason = self._pump(sub)
        except Exception as exc:  # noqa: BLE001  (anything here ends this run; the node carries on)
            reason = f"forwarding failed: {type(exc).__name__}: {exc}"
            log.exception("run %s", self.spec.stream_id)
        finally:
            self._ready.set()
            if reason:
                self._error(reason)
            self._finish(reason)

    def _pump(self, sub: Subscriber) -> str:
        """Forward until the stream ends, stop() or a failure; returns why it stopped ("" for the end)."""
        exited_at: float | None = None
        while not self._stop.is_set():
            try:
                message = sub.recv(timeout_s=0.2)
            except TimeoutError:
                process = self._process
                if process is not None and not process.is_alive():
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > EXITED_QUIET_S:
                        self._read_status()
                        if self._hung:
                            return f"{self._hung}; SIGKILLed"
                        last = f": {self._report[0]}" if self._report else ""
                        return f"the pipeline exited (code {process.exitcode}) before its EndOfStream{last}"
                continue
            except MessageError as exc:
                self._error(f"malformed result skipped: {exc}")
                continue
            if self._stop.is_set():
                break
            outcome = self._publish(message)
            if outcome is not None:
                return outcome
        return ""

    def _publish(self, message: Published) -> str | None:
        """Forward one result; None to go on, "" when the stream ended, else why forwarding stops."""
        message = dataclasses.replace(message, header=dataclasses.replace(message.header,
                                                                          stream_id=self.spec.stream_id))
        seq = message.header.seq
        if self.spec.kind == "job":
            skip = self.spec.skip_through
            if isinstance(message, Detections) and skip is not None and seq <= skip:
                return None  # stored by an earlier attempt
            if seq != self._next_seq:
                return (f"frames {self._next_seq} to {seq - 1} missing (lost in the pipeline): stopped before "
                        f"seq {seq} so the stored results stay in order")
        try:
            # a job's attempt stores only after the last result it knows stored: a later attempt's
            # (its node cut off past ack_wait_s, then back) make this one's publishes Superseded
            after = self._stored_through if self.spec.kind == "job" else None
            stored = self.publisher.publish(message, epoch=self.spec.epoch, after=after)
            self._stored_through = stored.stream_seq
        except FleetError as exc:
            if self.spec.kind == "job":
                return f"results not stored: {exc}"
            self._error(f"result {seq} not stored: {exc}")  # a camera goes on; the subscriber sees a gap
            return None
        now = time.monotonic()
        with self._lock:
            self._next_seq = seq + 1
            self._results += 1
            self._last_header = message.header
            self._drops = sum(n for _, n in message.header.drops)
            if isinstance(message, Detections):
                self._frames += 1
                self._times.append(now)
        if isinstance(message, EndOfStream):
            with self._lock:
                self._end, self._ended_at = message, now
            if message.error:
                self._error(message.error)
            return ""
        return None

    def _finish(self, reason: str) -> None:
        """The run's last word on NATS, from this thread: a camera's EndOfStream, a job's ack or hand-back."""
        with self._lock:
            end = self._end
        ended = end is not None
        if self.spec.kind == "camera":
            if not ended and self._stop.is_set() and self._end_stream:
                self._end_camera(self._stop_reason)
            self.outcome = "ended" if ended else ("stopped" if self._stop.is_set() else "failed")
            return
        job = self.job
        assert job is not None
        with self._lock:
            stored = self._next_seq  # frames stored, earlier attempts' included: a cancel's state says so
        try:
            if end is None and job.cancelled:
                job.settle_cancelled(frames=stored)
                self.outcome = "cancelled"
            elif end is not None:
                settled = job.fail(end.error, frames=end.header.seq) if end.error else \
                    job.done(frames=end.header.seq)
                self.outcome = ("failed" if end.error else "done") if settled else \
                    "cancelled" if job.cancelled else "superseded"
            else:
                why = self._stop_reason if self._stop.is_set() else \
                    reason or "the pipeline ended without an EndOfStream"
                self.outcome = hand_back(job, why, frames=stored)
            if self.outcome == "cancelled":
                # the cancel found the job running and left its stream to this run to end
                self.publisher.end_after_last(job.request.stream_id, job.cancelled)
        except (FleetError, RuntimeError) as exc:
            # not acknowledged: the server delivers it again after ack_wait_s, and the next attempt
            # finds what this one stored
            self._error(f"job {job.job_id}: {exc}")
            self.outcome = "unacknowledged"

    def _end_camera(self, reason: str) -> None:
        with self._lock:
            header = self._last_header
            next_seq = self._next_seq
        drops = header.drops if header is not None else ()
        end = EndOfStream(Header(self.spec.stream_id, next_seq, None, (), drops), f"stopped: {reason}")
        try:
            self.publisher.publish(end, epoch=self.spec.epoch)
        except FleetError as exc:
            self._error(f"EndOfStream not stored: {exc}")
            return
        with self._lock:
            self._results += 1


def hand_back(job: Job, why: str, frames: int | None = None) -> str:
    """Give a job back for another delivery, or fail it when this was its last allowed one, `frames`
    stored when given; "cancelled" where the job was cancelled meanwhile (its delivery then terminated)."""
    if job.attempt >= job.max_deliver:
        settled = job.fail(f"gave up after {job.attempt} attempts, the last: {why}", frames=frames)
        return "failed" if settled else "cancelled" if job.cancelled else "superseded"
    return "released" if job.fail(why, retry=True, frames=frames) else "cancelled" if job.cancelled else "superseded"


# ---------------------------------------------------------------------------- the pipeline process


STANDBY_STREAM = "standby"  # a standby pipeline's stream id inside; the node forwards under the camera's name
STANDBY_URL = "rtsp://standby.invalid/"  # a standby's placeholder source: never opened, the camera's replaces it


def standby_config(camera: RunConfig) -> RunConfig:
    """What a standby pipeline starts with: a camera run's settings, its source a placeholder."""
    return dataclasses.replace(camera, sources=(f"{STANDBY_STREAM}={STANDBY_URL}",))


class Spare:
    """A pipeline process started before it is needed; `give(spec)` runs it.

    Plain (`Spare()`): it has imported the pipeline (torch among it) and waits for its RunConfig.
    Standby (`Spare(standby=spec)`, a camera's spec made by standby_config): it has also started
    that pipeline, every stage but the decoder (the model loaded and warmed up), and waits for a
    camera's source: taking it over costs one decoder's start and the source's opening, not the
    pipeline's. A camera run fits it when only its source differs (`fits`)."""

    def __init__(self, standby: RunSpec | None = None) -> None:
        self.status, status_end = multiprocessing.Pipe(duplex=False)
        config_end, self._config = multiprocessing.Pipe(duplex=False)
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=pipeline_process, args=(config_end, status_end, os.getpid()),
                                       name="maskstream-standby" if standby else "maskstream-run", daemon=False)
        self.process.start()
        status_end.close()
        config_end.close()
        self.standby = standby
        self.started_at = time.monotonic()
        self.stopped_at: float | None = None  # time.monotonic() of the first stop()
        self.ready_at: float | None = None  # time.monotonic() when the node first saw it ready
        self.killed = False
        self.silence = Silence()
        if standby is not None:
            self._config.send(("standby", standby.config, standby.log_level, standby.model, "standby"))

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def ready(self) -> bool:
        """A standby's pipeline is warm (its inference stage reported ready); a plain spare: never."""
        self.read_status()
        return self.ready_at is not None

    def read_status(self) -> None:
        """Read what a standby's pipeline said (its status messages, "ready"): the node's loop does,
        every turn, so that its pipe never fills. A plain spare says nothing before its run."""
        if self.standby is None:
            return
        try:
            while self.status.poll():
                kind, _ = self.status.recv()
                self.silence.hear()
                if kind == "ready" and self.ready_at is None:
                    self.ready_at = time.monotonic()
        except (EOFError, OSError):
            pass

    def silent_s(self, clock: float) -> float:
        """A standby's silence on the node's loop clock (Silence) once it has said anything; 0 before
        (its start: imports, plan, its stages' start, which the ready timeout bounds)."""
        self.read_status()
        silent = self.silence.silent_s(clock)
        return silent if self.silence.heard else 0.0

    @property
    def endpoint(self) -> str | None:
        return self.standby.endpoint if self.standby is not None else None

    def fits(self, config: RunConfig) -> bool:
        """A camera run of `config` can take this standby over: live, one source, every other setting
        the standby's (its results on the standby's endpoint)."""
        if self.standby is None or config.source.policy != "live" or len(config.sources) != 1:
            return False
        standby = self.standby.config
        return dataclasses.replace(config, sources=standby.sources, source=standby.source,
                                   outputs=standby.outputs) == standby

    def give(self, spec: RunSpec) -> None:
        if self.standby is None:
            self._config.send(("run", spec.config, spec.log_level, spec.model, spec.title))
        else:
            if not self.fits(spec.config) or spec.endpoint != self.endpoint:
                raise ValueError(f"run {spec.stream_id}: its settings do not fit this standby pipeline")
            self._config.send(("source", spec.config, spec.log_level, spec.model, f"{spec.title} (was a standby)"))
        self._config.close()

    def stop(self) -> None:
        """Tell an unused spare to end, without waiting: it exits when its pipe closes; a standby is
        also signalled, so that one still loading its model stops its pipeline at once."""
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        self._config.close()
        self.status.close()
        if self.standby is not None and self.process.pid is not None and self.process.is_alive():
            try:
                os.kill(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def close(self, timeout_s: float = 20.0) -> None:
        """End an unused spare and wait for it (SIGKILL after timeout_s)."""
        self.stop()
        self.process.join(timeout_s if self.standby is not None else 5)
        if self.process.is_alive():
            self.kill()
            self.process.join()

    def kill(self) -> None:
        """SIGKILL, without waiting: for one that did not exit after stop() (a stopped or hung
        process never runs its SIGTERM handler), or went silent. Its stage processes with it: a
        stopped group would never see their supervisor gone."""
        self.killed = True
        kill_group(self.process)


def kill_group(process: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL a pipeline process and its stage processes: its process group, which it leads
    (pipeline_process). Stages left behind would run on unsupervised, or, stopped with it, never
    see it gone. Only while it has not been reaped: its pid, and so its group's id, are still its."""
    pid = process.pid
    if pid is None or not process.is_alive():
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
    except ProcessLookupError:
        return
    process.kill()  # not its group's leader yet: it has started no stage


class _Unused(Exception):
    """A standby's node closed it (or died) before giving it a source."""


def pipeline_process(config: Connection, conn: Connection, parent: int) -> None:
    """The child: waits for its RunConfig (with the log level and the chosen model), then plan +
    Supervisor.run over it, as `maskstream run` does, reporting to the node (a status message every
    PROGRESS_EVERY_S from the loop and while the stages stop; "ready"; the last "report"). A standby ("standby"
    first) runs its pipeline with the sources held until the camera's RunConfig comes ("source")."""
    os.setpgrp()  # a Ctrl-C at the node's terminal is for the node, which stops its runs itself
    name_process("pipeline (spare)", "pipeline")
    stopped: list[int] = []
    # Until the Supervisor installs its handlers, and again after it restores them at its end, a
    # SIGTERM from the node only notes the stop: the default action would leave the run's rings
    # and sockets behind.
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-node", daemon=True).start()
    from maskstream.pipeline.run_config import plan, source_specs
    from maskstream.pipeline.runtime.supervisor import Supervisor

    try:
        kind, cfg, log_level, model, title = config.recv()
    except (EOFError, OSError):  # an unused spare, or the node is gone
        raise SystemExit(0) from None
    standby = kind == "standby"
    if not standby:
        config.close()
    logs.configure(log_level)
    name_process(f"pipeline {title}", "pipeline")

    sent: dict[str, float] = {"at": 0.0}
    errors_sent: set[str] = set()
    counted: list[int] = []  # a job's input's frame count, from a thread: `fleet jobs` shows progress
    if not standby and cfg.source.policy == "offline":
        threading.Thread(target=_count_frames, args=(cfg, counted), name="count-frames", daemon=True).start()
    waiting = [standby]  # a standby without its source yet
    ready = [False]

    def take_source(supervisor: Any) -> None:
        if not ready[0] and supervisor.inference_ready():
            ready[0] = True
            _send(conn, "ready", [])
        try:
            if not config.poll():
                return
            _, camera, _, _, title = config.recv()
        except (EOFError, OSError):
            raise _Unused from None
        config.close()
        waiting[0] = False
        name_process(f"pipeline {title}", "pipeline")
        (spec,) = source_specs(camera).values()
        decoders = {s.stream_id: s.config for s in the_plan.specs if s.stream_id is not None}
        supervisor.give_sources({sid: dataclasses.replace(c, source=spec) for sid, c in decoders.items()})

    def status(supervisor: Any) -> None:
        # every PROGRESS_EVERY_S, with new stage errors or none: the node takes a pipeline process
        # silent for long for hung (Silence)
        now = time.monotonic()
        if now - sent["at"] < PROGRESS_EVERY_S:
            return
        sent["at"] = now
        if counted:
            _send(conn, "frames", [str(counted.pop())])
        errors = [r.last_error for r in list(supervisor.latest.values()) if r.last_error]
        fresh = [e for e in errors if e not in errors_sent]
        errors_sent.update(fresh)
        _send(conn, "status", fresh)

    def watch(supervisor: Any) -> None:
        if waiting[0]:
            take_source(supervisor)
        status(supervisor)

    try:
        the_plan = plan(cfg, log_level, model)
    except Exception as exc:  # noqa: BLE001  (the node reports it as the camera's or job's error)
        _send(conn, "report", [f"cannot start the pipeline: {type(exc).__name__}: {exc}"])
        raise SystemExit(2) from None
    try:
        if stopped:
            raise SystemExit(0)
        report = Supervisor(the_plan.specs, the_plan.reports, the_plan.streams, cfg.supervisor,
                            hold_sources=standby).run(watch, on_stopping=status)
    except _Unused:
        raise SystemExit(0) from None
    finally:
        the_plan.close()
    words = [report.failure, *(s.error for s in report.streams), *report.stage_errors]
    _send(conn, "report", [w for w in words if w])
    raise SystemExit(0 if not report.failure else 3)


def _count_frames(cfg: RunConfig, out: list[int]) -> None:
    """The input's frame count as `maskstream run` states it at its start (the container's count, or
    its duration times its rate), into out; nothing when unknown."""
    from maskstream.pipeline.media.sources import probe_source
    from maskstream.pipeline.run_config import source_specs

    try:
        (spec,) = source_specs(cfg).values()
        frames = probe_source(spec).frames
    except Exception as exc:  # noqa: BLE001  (the decoder reports what is wrong with the input)
        log.debug("frame count unknown: %s", exc)
        return
    if frames is not None:
        out.append(frames)


def _send(conn: Connection, kind: str, payload: Sequence[str]) -> None:
    try:
        conn.send((kind, list(payload)))
    except (OSError, ValueError):
        pass  # the node is gone


def _watch_parent(parent: int) -> None:
    """The node died (this process was reparented): stop the pipeline, at once (two signals)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
