"""The one stage loop every stage process runs: receive -> decode -> process -> encode -> send.

A stage is plain Python that never touches a socket: a `Stage` (below) declares every hook the
loop calls, with defaults, so a stage subclasses it and overrides only what it uses:

    class Stage(Protocol):
        def process(self, message) -> Output | Sequence[Output] | None  # Output: Message | Timed
        def flush(self) -> Sequence[Output]  # called when nothing arrived for idle_timeout_s
        idle_timeout_s: float | None         # None: flush is never called
        def progress(self) -> tuple[StreamProgress, ...]  # per stream, in every heartbeat
        def close(self) -> None              # once, when the loop ends
        live_streams: tuple[str, ...]        # + overtaken(message): see below

A source stage (decode, a `Source`) instead yields messages from `messages()`, may be asked to
`stop()` (drain: end its stream early, cleanly) and is told about frames dropped for lack of room.
It is made with an `OutputBuffers`, which hands out arrays that lie in the stage's
shared-memory ring: pixels written there (the decoder's frame planes) are sent without a
single copy.

A stage with `live_streams` (stream ids) is where live frames queue up (inference): the loop
takes every message already waiting, and a live stream's frame that a newer one of the same
stream has overtaken in that queue goes to `overtaken(message)` (the stage counts the drop)
instead of `process`, so a slow stage answers for the newest frame, not for a backlog.

The loop owns the sockets (pipeline.runtime.transport), stamps headers with the stage's receive and
send times (an output wrapped in `Timed` gives when the stage's work on it began instead),
sends a `StageReport` heartbeat (+ a pipeline.runtime.metrics snapshot) every heartbeat_s from a
thread of its own, so that heartbeats go on while the stage is being made (marked `starting`: a
model compiling at start is not a hung stage) and while it works on one message for long (a CPU
forward): each says what the stage is working on since when. It survives bad input: a malformed
message (every field is checked before use, against the run's limits in the Wiring, ring
references against the run's rings the stage reads) is counted and logged with the socket and
what was wrong (a flood: a few lines a window), a message whose processing
raises is counted and logged, and the loop goes on. A message whose processing raised is reported
lost (`LostFrame`), as is one whose ring slot its producer reclaimed while the stage used it, so that
the supervisor sends it again (docs/delivery.md; a malformed one is not: the frame it claims to be
cannot be trusted); the frame being worked on is also kept in the process's `BlackBox`, which the
supervisor reads if the process dies. Signals: SIGINT is ignored
(the supervisor decides; a terminal's Ctrl-C reaches the whole process group), SIGTERM stops the
loop at once, even inside process() (StageStopped is no Exception: per-message error handling never
catches it), and close() still runs; SIGUSR1 asks a source to drain. A stage whose parent (the
supervisor) has died stops too.

A process's arrays must not outlive `process()`: ring slots are released right after it.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import faulthandler
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from maskstream.pipeline import logs
from maskstream.pipeline.runtime.messages import (
    EndOfStream,
    Header,
    Limits,
    LostFrame,
    Message,
    MessageError,
    StageReport,
    StreamProgress,
)
from maskstream.pipeline.runtime.metrics import (
    DROPS,
    END_TO_END_SECONDS,
    ERRORS,
    FRAMES_IN,
    FRAMES_OUT,
    STAGE_SECONDS,
    MetricsSnapshot,
    StageMetrics,
)
from maskstream.pipeline.runtime.shm_ring import Ring, RingFull, RingReaders
from maskstream.pipeline.runtime.titles import name_process
from maskstream.pipeline.runtime.transport import (
    CurveServer,
    Inbox,
    Outbox,
    Publisher,
    ReportSender,
    pack,
    terminate,
    unpack,
)

__all__ = ["BlackBox", "OutputBuffers", "Source", "Stage", "StageStopped", "Wiring", "run_source", "run_stage"]

log = logging.getLogger("maskstream.stage")


@dataclass(frozen=True)
class Timed:
    """A stage's output whose work began at `start` (time.monotonic()), not when the message that
    released it arrived: the inference stage's batch kept on the device while the next one fills
    began when it was submitted, and its frames' stamps must say so."""

    message: Message
    start: float


Output = Message | Timed
StageT = TypeVar("StageT", "Stage", "Source")


class Stage(Protocol):
    """Every hook run_stage calls. A stage subclasses this and overrides what it uses; the
    defaults do nothing (no idle flush, no per-stream progress, no live streams)."""

    def process(self, message: Message) -> Output | Sequence[Output] | None: ...

    def flush(self) -> Sequence[Output]:
        """What the stage releases when nothing arrived for idle_timeout_s."""
        return ()

    @property
    def idle_timeout_s(self) -> float | None:
        """How long without input before flush() is called; None: never (asked before each receive)."""
        return None

    @property
    def live_streams(self) -> tuple[str, ...]:
        """Stream ids whose queued frames may be overtaken (see the module docstring)."""
        return ()

    def overtaken(self, message: Message) -> Output | Sequence[Output] | None:
        """A live stream's message that a newer one of its stream overtook in the queue."""
        return self.process(message)

    def progress(self) -> tuple[StreamProgress, ...]:
        """Per stream, in every heartbeat (see StreamProgress)."""
        return ()

    def close(self) -> None:
        """Once, when the loop ends (also on SIGTERM)."""
        return None  # a body, so that mypy does not take the default for an abstract method


class Source(Protocol):
    """Every hook run_source calls; progress() has a default."""

    live: bool

    def messages(self) -> Iterator[Message]: ...

    def stop(self) -> None: ...

    def dropped(self, message: Message) -> None: ...

    def progress(self) -> tuple[StreamProgress, ...]:
        return ()


class OutputBuffers:
    """Arrays for a stage's outgoing pixels, placed in a claimed slot of its ring (see
    pipeline.runtime.shm_ring.Ring.claim), so that sending them copies nothing.

    wait=True (offline) waits for a free slot, sending heartbeats meanwhile; wait=False
    (live) never waits: with every slot busy the array is ordinary memory, and the send that
    follows finds no slot either and drops the frame, counted. One message is made and sent
    at a time, so a new array gives back the slot of a previous one that was never sent
    (a skipped frame). Without a ring (tests, benchmarks), arrays are ordinary memory."""

    def __init__(self, ring: Ring | None = None, on_wait: Callable[[], None] | None = None):
        self.ring, self.on_wait = ring, on_wait

    def array(self, shape: tuple[int, ...], wait: bool) -> np.ndarray:
        """An uninitialised uint8 array of `shape`."""
        nbytes = int(np.prod(shape))
        if self.ring is None or nbytes > self.ring.slot_bytes:
            return np.empty(shape, dtype=np.uint8)
        self.ring.release_claims()
        try:
            view = self.ring.claim(nbytes, timeout_s=None if wait else 0.0, on_wait=self.on_wait)
        except RingFull:
            return np.empty(shape, dtype=np.uint8)
        return np.frombuffer(view, dtype=np.uint8).reshape(shape)


class StageStopped(BaseException):
    """SIGTERM (or the supervisor's death): leave the loop now.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` catches it: the loop's
    own per-message handler (a message whose processing raises is logged and skipped) would
    otherwise take a stop that lands inside process() for a bad message and serve on, and so would
    any library a stage calls. The handler also records the stop (`_stopping`), which the loop
    checks between messages, in case something catches BaseException and does not re-raise."""


Identity = tuple[str, int, float]  # (stream_id, seq, decoded_at): one frame of one decoder life


class BlackBox:
    """The frame a stage process is working on, in memory shared with its supervisor, which reads
    it once the process has died: a frame that kills its stage at once does so before any
    heartbeat could name it, and a death must count against the stream of the frame that caused
    it, not against every stream (docs/delivery.md). Made by the supervisor for each process it
    starts (`context`: its multiprocessing context), written by the stage loop at every message."""

    _HEAD = struct.Struct("<qdB")  # seq, decoded_at, length of the stream id (0: not working on a frame)

    def __init__(self, context: Any):
        self._buffer = context.RawArray(ctypes.c_char, self._HEAD.size + 255)

    def write(self, frame: Identity | None) -> None:
        self._buffer[self._HEAD.size - 1] = b"\x00"  # first: a process killed mid-write leaves no half record
        if frame is not None:
            name = frame[0].encode()[:255]
            self._buffer[self._HEAD.size : self._HEAD.size + len(name)] = name
            self._HEAD.pack_into(self._buffer, 0, frame[1], frame[2], len(name))  # the length last

    def read(self) -> Identity | None:
        seq, decoded_at, length = self._HEAD.unpack_from(self._buffer, 0)
        if not length:
            return None
        name = bytes(self._buffer[self._HEAD.size : self._HEAD.size + length]).decode(errors="replace")
        return name, seq, decoded_at


# A flood of malformed messages is logged this many lines per window, then counted.
MALFORMED_LOG_LINES = 10
MALFORMED_LOG_WINDOW_S = 10.0


class _Throttle:
    """At most `lines` log lines per window of `window_s`; `held` says how many were left out."""

    def __init__(self, lines: int, window_s: float):
        self.lines, self.window_s = lines, window_s
        self.window_start, self.logged, self.skipped = -window_s, 0, 0

    def held(self, now: float) -> int | None:
        """The count left out in a window that has just ended (once), else None."""
        if now - self.window_start < self.window_s or not self.skipped:
            return None
        skipped, self.skipped = self.skipped, 0
        return skipped

    def allow(self, now: float) -> bool:
        if now - self.window_start >= self.window_s:
            self.window_start, self.logged = now, 0
        if self.logged < self.lines:
            self.logged += 1
            return True
        self.skipped += 1
        return False


@dataclass(frozen=True)
class Wiring:
    """Where a stage process connects; made by the supervisor, passed at process start."""

    stage: str  # "preprocess.1", "decode.cam0": kind.instance
    reports: str  # the supervisor's report endpoint
    inbox: str | None = None  # bound here (PULL)
    outboxes: tuple[str, ...] = ()  # every instance of the next stage (PUSH)
    publish: str | None = None  # PUB endpoint bound here (the publish stage)
    publish_curve: CurveServer | None = None  # its CurveZMQ keys (None: plain)
    ring: str | None = None  # this stage's shared-memory ring for the pixel buffers it sends
    hwm: int = 4
    heartbeat_s: float = 0.5
    parent_pid: int = 0
    torch_threads: int = 1  # 0: leave torch's default
    log_level: str = "warning"  # pipeline.logs.LEVELS: the run's --log-level, in every stage process
    blackbox: BlackBox | None = None  # given by the supervisor at each start
    limits: Limits = Limits()  # what the inbox accepts (every message is checked against them)
    reads: tuple[str, ...] = ()  # the run's rings whose slots this stage's inbox may reference

    @property
    def kind(self) -> str:
        return self.stage.split(".", 1)[0]


def _setup_process(wiring: Wiring) -> None:
    # Once per process, here and not in a constructor: thread pools are process-wide, and on
    # a 2-core host every stage but inference must stay on one core.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stopped)
    logs.configure(wiring.log_level)
    faulthandler.register(signal.SIGUSR2)  # `kill -USR2 PID` prints where a stage is stuck
    # `ps -f` shows "maskstream: decode.cam0"; `ps -o comm` and tests tell the stages apart by "decode.cam0"
    name_process(wiring.stage)
    import cv2

    cv2.setNumThreads(1)
    # Only in a stage that has loaded torch already (its module imports it, and the process
    # imported that module to start it): the others never load it, for these flags or otherwise.
    torch = sys.modules.get("torch")
    if torch is not None:
        if wiring.torch_threads:
            torch.set_num_threads(wiring.torch_threads)
        torch.set_flush_denormal(True)


_stopping = threading.Event()  # set once by the first SIGTERM; the loops leave when they see it


def _raise_stopped(signum: int, frame: Any) -> None:
    if _stopping.is_set():
        return  # already stopping: a second SIGTERM must not break into close()
    _stopping.set()
    raise StageStopped(f"signal {signum}")


def _check_stopped() -> None:
    """Raise StageStopped if a stop arrived and something swallowed its exception."""
    if _stopping.is_set():
        raise StageStopped("stopped")


def _supervisor_gone(wiring: Wiring) -> bool:
    """Whether the supervisor that started this stage has exited (the stage was reparented)."""
    return bool(wiring.parent_pid) and os.getppid() != wiring.parent_pid


def gpu_memory_mb() -> float | None:
    """Peak MB this process's torch CUDA allocator has reserved, None where it has not used CUDA.

    Read only when torch is imported already: a stage that never loads it does not load it for this.
    The CUDA context itself (a few hundred MB) is not in it; nvidia-smi's per-process figure has it
    but, in a container, often lists host process ids that match none of ours."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return float(torch.cuda.max_memory_reserved()) / 2**20


class _Reporter:
    """The stage's heartbeats, sent from a thread with its own socket (ZeroMQ sockets are not
    thread-safe), so that they go on while the main thread is busy for long: while the stage is
    being made (loading, compiling: reports marked `starting`) and while it works on one message
    (a large model's forward on a CPU). The main thread hands over the report to send
    (`update`) and says what it is doing (`activity`); the thread sends the latest report every
    heartbeat_s, at once when asked, and once more when closed. It also stops the process, as the
    loop would, once the supervisor has died."""

    def __init__(self, wiring: Wiring):
        self.wiring = wiring
        self._latest = (StageReport(stage=wiring.stage, pid=os.getpid(), sent_at=time.monotonic(), starting=True),
                        StageMetrics(wiring.kind).snapshot())
        # (what, since): since is time.monotonic() when the work began, 0.0 when not working (idle, or
        # waiting for room downstream). One tuple, assigned at once: the thread never sees half of it.
        self.activity: tuple[str, float] = ("", 0.0)
        self._wake, self._closing = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def update(self, report: StageReport, metrics: MetricsSnapshot, now: bool = False) -> None:
        self._latest = (report, metrics)
        if now:
            self._wake.set()

    def close(self) -> None:
        """Send the latest report once more, then end the thread."""
        self._closing.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        sender = ReportSender(self.wiring.reports)
        try:
            while True:
                self._wake.wait(self.wiring.heartbeat_s)
                self._wake.clear()
                closing = self._closing.is_set()
                if not closing and _supervisor_gone(self.wiring):
                    os.kill(os.getpid(), signal.SIGTERM)  # StageStopped in the main thread
                    return
                (report, metrics), (what, since) = self._latest, self.activity
                # sent_at stays when the main thread made the report: how fresh its content is
                sender.send(dataclasses.replace(report, working_on=what, working_since=since), metrics)
                if closing:
                    return
        finally:
            sender.close()


def _identity(header: Header) -> Identity:
    first = header.stamps[0] if header.stamps else None
    return header.stream_id, header.seq, first.start if first is not None and first.stage == "source" else 0.0


class _Loop:
    """Sockets, counters, heartbeats and lost frames shared by run_stage and run_source."""

    def __init__(self, wiring: Wiring):
        self.wiring = wiring
        self.kind = wiring.kind
        self.metrics = StageMetrics(self.kind)
        self.reporter = _Reporter(wiring)
        self.reporter.start()  # first: a stage being made reports `starting`
        self.counts = {"received": 0, "sent": 0, "malformed": 0, "errors": 0}
        self.last_error = ""
        self.busy_s = 0.0
        self.next_report = 0.0
        self.progress: Callable[[], tuple[StreamProgress, ...]] = tuple
        self.drops_counted: dict[str, int] = {}
        # Frames received and not passed on, the latest first to go: every report carries them until then,
        # so a report the supervisor missed loses none (it handles each once).
        self.lost: collections.deque[LostFrame] = collections.deque(maxlen=64)
        # Frames whose input slot was reclaimed while the stage used it: what came of them is dropped
        # when the stage gives it out (the inference stage may hold a frame for a later batch).
        self.tainted: set[Identity] = set()
        self.source = False  # a source's black box keeps the last frame it made, not the one it works on
        self.inbox = Inbox(wiring.inbox, wiring.hwm, wiring.limits.max_part_bytes()) if wiring.inbox else None
        self.outbox = Outbox(wiring.outboxes, wiring.hwm) if wiring.outboxes else None
        self.publisher = Publisher(wiring.publish, 1000, wiring.publish_curve) if wiring.publish else None
        self.ring = Ring.attach(wiring.ring) if wiring.ring else None
        if self.ring is not None:
            self.ring.reclaim_all()  # slots of a previous life of this stage are stale
        self.readers = RingReaders(wiring.reads)
        self.malformed_log = _Throttle(MALFORMED_LOG_LINES, MALFORMED_LOG_WINDOW_S)

    def report(self, force: bool = False, fatal: str = "", last: bool = False) -> None:
        """Hand the heartbeat thread a fresh report (at most every heartbeat_s unless forced); the
        last one, made while closing, never stops the stage (it is stopping)."""
        now = time.monotonic()
        if not force and now < self.next_report:
            return
        self.next_report = now + self.wiring.heartbeat_s
        if not last and _supervisor_gone(self.wiring):
            raise StageStopped("the supervisor has exited")
        streams = self.progress()
        for progress in streams:  # the stage counts its drops (see StreamProgress); metrics follow them
            counted = self.drops_counted.get(progress.stream_id, 0)
            if progress.drops > counted:
                self.metrics.inc(DROPS, progress.stream_id, progress.drops - counted)
                self.drops_counted[progress.stream_id] = progress.drops
        self.reporter.update(
            StageReport(
                stage=self.wiring.stage, pid=os.getpid(), sent_at=now, last_error=self.last_error,
                busy_s=self.busy_s, streams=streams, fatal=fatal, gpu_mb=gpu_memory_mb(),
                received=self.counts["received"], sent=self.counts["sent"], malformed=self.counts["malformed"],
                errors=self.counts["errors"], lost=tuple(self.lost),
            ),
            self.metrics.snapshot(),
            now=force,
        )

    def working(self, what: str, frame: Identity | None = None) -> None:
        self.reporter.activity = (what, time.monotonic())
        if self.wiring.blackbox is not None and not self.source:
            self.wiring.blackbox.write(frame)

    def idle(self) -> None:
        self.reporter.activity = ("", 0.0)
        if self.wiring.blackbox is not None and not self.source:
            self.wiring.blackbox.write(None)

    def made(self, frame: Identity) -> None:
        """A source's latest frame, kept in its black box: a live decoder started again after its
        death numbers its frames on after every one the dead one made (no seq is made twice)."""
        if self.wiring.blackbox is not None:
            self.wiring.blackbox.write(frame)

    def waiting(self) -> None:
        """Blocked for room downstream: no work of this stage (the watchdog's stall clock may run)."""
        self.reporter.activity = ("waiting for room downstream", 0.0)
        self.report()

    def lose(self, frame: Identity | None, reason: str) -> None:
        """A received frame that goes no further: reported at once, for the supervisor to send it again."""
        if frame is not None:
            self.lost.append(LostFrame(*frame, reason[:300]))
            self.report(force=True)

    def error(self, what: str, stream: str = "", throttle: _Throttle | None = None) -> None:
        self.last_error = f"{self.wiring.stage}: {what}"
        self.metrics.inc(ERRORS, stream)
        if throttle is None:
            log.warning("%s", self.last_error)
            return
        held = throttle.held(time.monotonic())
        if held is not None:
            log.warning("%s: %d more malformed messages in the last %.0f s were not logged", self.wiring.stage,
                        held, throttle.window_s)
        if throttle.allow(time.monotonic()):
            log.warning("%s", self.last_error)

    def malformed(self, problem: str) -> None:
        """A message refused before use: counted, logged with the socket and why (a flood of them is
        logged a few lines a window, with how many were not), never passed on."""
        assert self.inbox is not None
        self.counts["malformed"] += 1
        self.error(f"malformed message on {self.inbox.endpoint}: {problem}", throttle=self.malformed_log)

    def send(self, message: Output, start: float, block: bool = True) -> bool:
        """Stamp and send one message; False if it was dropped (block=False and no room)."""
        if isinstance(message, Timed):
            start = message.start
            message = message.message
        if self.tainted and _identity(message.header) in self.tainted:
            self.tainted.discard(_identity(message.header))
            return True  # reported lost already; its pixels may have been another frame's
        stream = message.header.stream_id
        message = dataclasses.replace(message, header=message.header.stamped(self.kind, start, time.monotonic()))
        if self.outbox is None and message.header.stamps:  # the last stage; the first stamp is the decode time
            self.metrics.observe(END_TO_END_SECONDS, stream, time.monotonic() - message.header.stamps[0].start)
        if self.publisher is not None:
            self.publisher.send(message)
        elif self.outbox is not None:
            try:
                frames, refs = pack(message, self.ring, wait_s=None if block else 0.0, on_wait=self.waiting)
            except RingFull:
                return False
            if not self.outbox.send(frames, block=block, on_wait=self.waiting):
                for ref in refs:
                    assert self.ring is not None
                    self.ring.release(ref)
                return False
        self.counts["sent"] += 1
        self.metrics.inc(FRAMES_OUT, stream)
        return True

    def close(self) -> None:
        held = self.malformed_log.held(float("inf"))
        if held:
            log.warning("%s: %d more malformed messages were not logged", self.wiring.stage, held)
        self.reporter.close()  # the last report goes before the context ends
        for part in (self.inbox, self.outbox, self.publisher):
            if part is not None:
                part.close()
        terminate()
        if self.ring is not None:
            self.ring.close()
        self.readers.close()


def _outputs(result: Output | Sequence[Output] | None) -> Sequence[Output]:
    if result is None:
        return ()
    if isinstance(result, Sequence):
        return result
    return (result,)


def _start(make: Callable[[_Loop], StageT], wiring: Wiring) -> tuple[_Loop, StageT]:
    """Sockets and heartbeats first (so a fatal error can be reported, and making a stage that takes
    long is not taken for a hung one), then the stage itself."""
    _setup_process(wiring)
    loop = _Loop(wiring)
    try:
        stage = make(loop)
    except StageStopped:  # told to stop (or the supervisor died) while starting: not a failure
        loop.close()
        raise SystemExit(0) from None
    except Exception as exc:
        loop.error(f"cannot start: {type(exc).__name__}: {exc}")
        loop.report(force=True, fatal=loop.last_error, last=True)
        loop.close()
        # The process entry point: a non-zero exit code is how the supervisor learns it for sure.
        raise SystemExit(1) from None
    loop.progress = stage.progress
    return loop, stage


def _handle(loop: _Loop, action: Callable[[Message], Any], frames: list[Any], start: float) -> Sequence[Output]:
    """One received message through the stage's `action` (process, or overtaken). A function
    of its own so that nothing here (the input's arrays point into ring slots) outlives it.
    A valid message that goes no further (its processing raised, its ring slot was reclaimed
    while in use) is reported lost (docs/delivery.md)."""
    assert loop.inbox is not None
    loop.counts["received"] += 1
    try:
        received = unpack(frames, loop.readers, loop.wiring.limits)
    except MessageError as exc:
        # Not reported lost: the identity a malformed message claims cannot be trusted, and a flood of
        # them would rewind streams without end. A real frame lost this way is sent again by the
        # stall rule (docs/delivery.md).
        loop.malformed(str(exc))
        return ()
    except StageStopped:
        raise
    except Exception as exc:  # a check that itself failed on strange input: still the input's fault
        loop.malformed(f"{type(exc).__name__}: {exc}")
        return ()
    message = received.message
    header = message.header
    loop.metrics.inc(FRAMES_IN, header.stream_id)
    loop.working(f"{type(message).__name__} {header.stream_id}#{header.seq}", _identity(header))
    lost = ""
    try:
        result = action(message)
    except Exception as exc:  # one bad message never stops the stage
        loop.counts["errors"] += 1
        lost = f"{type(exc).__name__}: {exc}"
        loop.error(f"{type(message).__name__} of stream {header.stream_id!r} seq {header.seq}: {lost}",
                   header.stream_id)
        result = None
    finally:
        # Read after the work: a producer that restarted meanwhile may have written another frame there.
        intact = received.intact()
        received.release()
        loop.idle()
    if not intact:
        loop.tainted.add(_identity(header))
        lost = lost or "its ring slot was reclaimed by a restarted producer while in use"
    if lost:
        loop.lose(_identity(header), f"{loop.wiring.stage}: {lost}")
    elapsed = time.monotonic() - start
    loop.busy_s += elapsed
    loop.metrics.observe(STAGE_SECONDS, header.stream_id, elapsed)
    return _outputs(result)


def run_stage(make: Callable[[], Stage], wiring: Wiring) -> None:
    """Serve a stage until SIGTERM or the supervisor's death."""
    loop, stage = _start(lambda loop: make(), wiring)
    assert loop.inbox is not None, f"{wiring.stage}: a stage needs an inbox"
    live = {stream.encode() for stream in stage.live_streams}  # topics
    try:
        loop.report(force=True)
        while True:
            _check_stopped()
            idle = stage.idle_timeout_s
            frames = loop.inbox.recv(min(wiring.heartbeat_s, idle) if idle is not None else wiring.heartbeat_s)
            start = time.monotonic()
            if frames is None:
                if idle is not None:
                    loop.working("flushing what it holds")
                    try:
                        flushed = stage.flush()
                    except Exception as exc:  # what the stage held failed (it says which frames); it goes on
                        loop.counts["errors"] += 1
                        loop.error(f"flush: {type(exc).__name__}: {exc}")
                        flushed = ()
                    loop.idle()
                    for message in flushed:
                        loop.send(message, start)
                loop.report()
                continue
            # limit: more than a hop holds (both sides' high-water marks), so all that waits is seen
            for queued, was_overtaken in with_queued(loop.inbox, frames, live, limit=4 * wiring.hwm + 8):
                for message in _handle(loop, stage.overtaken if was_overtaken else stage.process, queued, start):
                    loop.send(message, start)
                start = time.monotonic()
            loop.report()
    except StageStopped:
        pass
    finally:
        loop.working("closing")
        stage.close()
        loop.idle()
        loop.report(force=True, last=True)
        loop.close()


def with_queued(inbox: Inbox, frames: list[Any], live: set[bytes], limit: int) -> list[tuple[list[Any], bool]]:
    """(message, overtaken) for the received message and, for a stage with live streams, every
    message already queued behind it: a live stream's message is overtaken when a later one of
    the same stream is in that queue (its end of stream included: a live stream stops at once).
    "Later" is arrival order, as for the stage's own staleness drops; publish restores seq order."""
    if not live:
        return [(frames, False)]
    batch = [frames, *inbox.drain(limit)]
    topics = [_topic(message) for message in batch]
    newest = {topic: i for i, topic in enumerate(topics)}  # stream id -> its last message here
    return [(message, topic in live and newest[topic] != i) for i, (message, topic) in enumerate(zip(batch, topics))]


def _topic(frames: list[Any]) -> bytes:
    first = frames[0]
    return bytes(first.buffer if hasattr(first, "buffer") else first)


def run_source(make: Callable[[OutputBuffers], Source], wiring: Wiring) -> None:
    """Send a source's messages downstream until it ends; SIGUSR1 asks it to end early."""
    loop, source = _start(lambda loop: make(OutputBuffers(loop.ring, loop.waiting)), wiring)
    loop.source = True
    signal.signal(signal.SIGUSR1, lambda signum, frame: source.stop())
    try:
        loop.report(force=True)
        messages = source.messages()
        while True:
            _check_stopped()
            # Reading (a file, a camera that reconnects) is this stage's work; waiting for a ring
            # slot inside it is not (OutputBuffers calls loop.waiting), nor is sending.
            loop.working("reading its source")
            message = next(messages, None)
            loop.idle()
            if message is None:
                break
            loop.made(_identity(message.header))
            start = time.monotonic()
            final = isinstance(message, EndOfStream)
            # Offline waits for room (lossless); live drops the frame (newest wins) and counts it.
            if not loop.send(message, start, block=final or not source.live):
                source.dropped(message)  # counted in its progress, which the DROPS metric follows
            loop.report()
        # Stay until the supervisor stops us: a ZeroMQ peer that disconnects loses the messages
        # its receiver has not read yet (those still in the kernel's socket buffer), so a
        # decoder that exited right after its EndOfStream would lose its last frames.
        while True:
            _check_stopped()
            loop.report(force=True)
            time.sleep(wiring.heartbeat_s)
    except StageStopped:
        pass
    finally:
        loop.report(force=True, last=True)
        loop.close()
