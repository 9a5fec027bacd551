"""Offline jobs: files or URLs to process, queued on a JetStream work-queue stream.

`JobQueue.submit(inputs)` writes each job's state (`queued`) to the state bucket and publishes a
`JobRequest` on `jobs.subject`, with the job id as its Nats-Msg-Id (a submit retried within the
duplicate window queues the job once). The stream keeps a job until a node acknowledges it.

Every node pulls from one durable consumer (`jobs.consumer`): explicit acknowledgement, `ack_wait_s`,
`max_deliver`. `JobWorker.take()` returns a `Job` and marks it `running` on that node; while the
node holds it, a task on the FleetClient's loop tells the server it is still in progress every
`progress_interval_s`, so a long job is not redelivered while its node lives. The node calls
`Job.done()` only once the job's results are durable (every ResultPublisher.publish returned): the
state becomes `done`, then the acknowledgement is confirmed by the server. A node that dies stops
the heartbeats; after `ack_wait_s` the server delivers the job again, to whichever node pulls next,
as attempt 2, 3, ... up to `max_deliver`. Nodes that see a node's presence go hand its jobs back
sooner, through the dead delivery's acknowledgement subject kept in the job's state
(`JobWorker.reclaim`). Results are published with `Nats-Msg-Id: <stream>:<seq>`,
so a re-run stores each frame once (results.py).

`Job.fail(error)` ends a job for good (`failed`, the message terminated: a corrupt file does not
come back); `fail(error, retry=True)` asks for another delivery at once.

Job ids double as the results' stream id: `<file stem>-<8 hex digits>`, readable and unique, so
two submissions of one file never share (and so de-duplicate) results.

State writes are compare-and-set and never go back to an older attempt: a node that was only
slow (or cut off past ack_wait_s) cannot overwrite the state of the attempt that replaced it, nor
acknowledge it: the server settles a work-queue message by its stream sequence, whichever delivery
an ack comes from, so a late `done()` or `fail()` that finds a later attempt does nothing. The other
way round, a delivery whose job another attempt has already ended (a late `done()` that came between
this delivery and its claim, or an acknowledgement lost after the state was written) is settled as
that attempt settled it and not run again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import nats.errors
import nats.js.errors
from maskstream.pipeline.fleet import records
from maskstream.pipeline.fleet.config import FleetConfig, JobsConfig
from maskstream.pipeline.fleet.connection import UNAVAILABLE, FleetClient, FleetError, kv_snapshot, retrying
from maskstream.pipeline.fleet.leases import NodeInfo
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue

__all__ = ["Job", "JobNotFound", "JobQueue", "JobRequest", "JobState", "JobWorker", "ensure_jobs", "new_job_id"]

log = logging.getLogger(__name__)

State = Literal["queued", "running", "done", "failed", "cancelled"]
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")


class JobNotFound(FleetError):
    """No job of that id."""


@dataclass(frozen=True)
class JobRequest:
    """What a node needs to run a job: the input (a path every node can read, or a URL)."""

    job_id: str
    input: str
    submitted_at: float  # time.time()

    def __post_init__(self) -> None:
        if not _JOB_ID.fullmatch(self.job_id):
            raise ValueError(f"job id {self.job_id!r}: letters, digits, '_' and '-' only")
        if not self.input:
            raise ValueError(f"job {self.job_id}: empty input")

    @property
    def stream_id(self) -> str:
        return self.job_id


@dataclass(frozen=True)
class JobState:
    """One line of `fleet jobs`."""

    job_id: str
    input: str
    state: State
    node: str = ""  # the node of the latest attempt
    attempt: int = 0  # deliveries so far (1 on the first run)
    error: str = ""
    submitted_at: float = 0.0  # time.time()
    updated_at: float = 0.0
    frames: int = 0  # frames whose results are stored, earlier attempts' included
    frames_total: int | None = None  # the input's frame count, once its node has opened it (None: unknown)
    frames_per_s: float = 0.0  # the latest attempt's rate while it runs
    instance: str = ""  # which start of `node` holds the latest attempt (LeaseManager.instance)
    reply: str = ""  # that delivery's acknowledgement subject: another node hands the job back through it


def new_job_id(source: str) -> str:
    stem = Path(source.split("?")[0].rstrip("/")).stem or "job"
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:40]
    return f"{stem}-{secrets.token_hex(4)}"


def normalise_input(source: str, check_exists: bool) -> str:
    """A URL as given; a path made absolute (nodes do not share the submitter's working directory)."""
    if "://" in source:
        return source
    path = Path(source).expanduser().resolve()
    if check_exists and not path.is_file():
        raise ValueError(f"job input {source!r}: no such file ({path})")
    return str(path)


# ---------------------------------------------------------------------------- provisioning


def _stream_config(config: FleetConfig) -> api.StreamConfig:
    jobs = config.jobs
    return api.StreamConfig(
        name=jobs.stream, subjects=[jobs.subject], retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE, num_replicas=config.replicas, max_age=jobs.max_age_s,
        duplicate_window=min(120.0, jobs.max_age_s),
    )


def _consumer_config(jobs: JobsConfig) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=jobs.consumer, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=jobs.ack_wait_s,
        max_deliver=jobs.max_deliver, deliver_policy=api.DeliverPolicy.ALL, filter_subject=jobs.subject,
        max_ack_pending=10_000,
    )


async def _ensure(client: FleetClient) -> KeyValue:
    jobs = client.config.jobs
    await client.ensure_stream(_stream_config(client.config))
    await client.js.add_consumer(jobs.stream, config=_consumer_config(jobs))
    return await client.ensure_kv(api.KeyValueConfig(
        bucket=jobs.state_bucket, history=1, ttl=jobs.state_max_age_s, replicas=client.config.replicas, direct=True))


def ensure_jobs(client: FleetClient) -> None:
    """Create the jobs stream, its consumer and the state bucket, or bring them to the config."""
    client.run(_ensure(client))


ENDED = ("done", "failed", "cancelled")


def _not_later(current: JobState, state: JobState) -> bool:
    return current.attempt <= state.attempt


def _not_ended(current: JobState, state: JobState) -> bool:
    return current.attempt <= state.attempt and current.state not in ENDED


def _still_running(current: JobState, state: JobState) -> bool:
    return current.attempt == state.attempt and current.state == "running"


def _not_later_nor_cancelled(current: JobState, state: JobState) -> bool:
    return current.attempt <= state.attempt and current.state != "cancelled"


async def _change_state(kv: KeyValue, job_id: str, change: Callable[[JobState | None], JobState | None],
                        tries: int = 5) -> tuple[JobState | None, bool]:
    """Read-modify-write of a job's state by compare-and-set: change(stored, None where there is
    none) gives the state to write, or None to keep the stored one. Returns the stored state it was
    given and whether it was replaced."""
    for _ in range(tries):
        try:
            entry = await kv.get(job_id)
        except nats.js.errors.KeyNotFoundError:
            state = change(None)
            if state is None:
                return None, False
            try:
                await kv.create(job_id, records.pack(state))
                return None, True
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        current = records.unpack(JobState, entry.value or b"", f"job {job_id}")
        state = change(current)
        if state is None:
            return current, False
        try:
            await kv.update(job_id, records.pack(state), last=entry.revision)
            return current, True
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
    raise FleetError(f"job {job_id}: state changed under us {tries} times in a row")


async def _write_state(kv: KeyValue, state: JobState,
                       replaces: Callable[[JobState, JobState], bool] = _not_later) -> JobState | None:
    """Write `state` where the stored one may give way to it (`replaces(stored, state)`; by default
    unless it belongs to a later attempt): None when written, else the stored state that kept it."""
    stored, written = await _change_state(
        kv, state.job_id, lambda current: state if current is None or replaces(current, state) else None)
    return None if written else stored


# ---------------------------------------------------------------------------- submitting, listing


class JobQueue:
    """Submit jobs and read their states."""

    def __init__(self, client: FleetClient) -> None:
        self.client = client
        self.config: JobsConfig = client.config.jobs

    def ensure(self) -> None:
        ensure_jobs(self.client)

    def submit(self, inputs: Sequence[str], check_exists: bool = True) -> list[str]:
        """Queue one job per input (path or URL); returns their ids, in order.

        Paths are made absolute and, with check_exists, must be files here: every node must read
        the same path (a shared mount) or a URL."""
        if isinstance(inputs, str):
            raise ValueError("inputs: expected a list of paths or URLs, got one string")
        requests = [JobRequest(new_job_id(src), normalise_input(src, check_exists), time.time()) for src in inputs]
        self.client.run(self._submit(requests))
        return [r.job_id for r in requests]

    def jobs(self) -> list[JobState]:
        """Every job the state bucket remembers, oldest submission first."""
        return sorted(self.client.run(self._jobs()), key=lambda s: (s.submitted_at, s.job_id))

    def get(self, job_id: str) -> JobState:
        return self.client.run(self._get(job_id))

    def cancel(self, job_id: str, why: str = "") -> JobState:
        """End a job that has not ended: its state becomes `cancelled` (error: "cancelled: <why>", or
        "cancelled" without one) and no node runs it again. A queued job is never run (the node that
        pulls it drops it) and its results stream, if an earlier attempt stored any, ends with an
        EndOfStream saying why; a running one is stopped by its node within jobs.status_interval_s or
        so (its progress write finds the state), which writes the frames stored into the cancelled
        state, then ends the stream so. Returns the state as it was before: an ended job (done,
        failed, cancelled) is left as it is (see its `state`). JobNotFound for an unknown id."""
        error = f"cancelled: {why}" if why else "cancelled"
        before = self.client.run(self._cancel(job_id, error))
        if before.state == "queued":
            from maskstream.pipeline.fleet.results import ResultPublisher

            ResultPublisher(self.client).end_after_last(job_id, error)
        return before

    async def _cancel(self, job_id: str, error: str) -> JobState:
        """Cancel over whatever state the job has when the write lands (any attempt's, any node's),
        unless it has ended; the state it replaced (or the ended one)."""
        kv = await self._states_of(job_id)

        def cancelled(current: JobState | None) -> JobState | None:
            if current is None or current.state in ENDED:
                return None
            return replace(current, state="cancelled", error=error, frames_per_s=0.0, updated_at=time.time())

        before, _ = await _change_state(kv, job_id, cancelled)
        if before is None:
            raise JobNotFound(f"no job {job_id!r}")
        return before

    async def _submit(self, requests: list[JobRequest]) -> None:
        kv = await self.client.js.key_value(self.config.state_bucket)
        for request in requests:
            state = JobState(request.job_id, request.input, "queued", submitted_at=request.submitted_at,
                             updated_at=request.submitted_at)
            await kv.create(request.job_id, records.pack(state))
            try:
                await self.client.js.publish(self.config.subject, records.pack(request), stream=self.config.stream,
                                             headers={"Nats-Msg-Id": request.job_id})
            except BaseException:
                await kv.delete(request.job_id)
                raise

    async def _jobs(self) -> list[JobState]:
        snapshot = await kv_snapshot(self.client, self.config.state_bucket)
        out = []
        for key, (_, value) in snapshot.items():
            try:
                out.append(records.unpack(JobState, value, f"job {key}"))
            except records.RecordError as exc:
                log.warning("skipping job state %s: %s", key, exc)
        return out

    async def _states_of(self, job_id: str) -> KeyValue:
        """The job states' bucket, for a well-formed job id (JobNotFound for any other)."""
        if not _JOB_ID.fullmatch(job_id):
            raise JobNotFound(f"{job_id!r} is not a job id")
        return await self.client.js.key_value(self.config.state_bucket)

    async def _get(self, job_id: str) -> JobState:
        kv = await self._states_of(job_id)
        try:
            entry = await kv.get(job_id)
        except nats.js.errors.KeyNotFoundError:
            raise JobNotFound(f"no job {job_id!r}") from None
        return records.unpack(JobState, entry.value or b"", f"job {job_id}")


# ---------------------------------------------------------------------------- running


class Job:
    """A job a node holds: run it, then `done()` or `fail(error)`. Heartbeats run until then."""

    def __init__(self, worker: JobWorker, msg: Msg, request: JobRequest, state: JobState) -> None:
        self.request = request
        self.attempt = state.attempt
        self.redelivered = state.attempt > 1
        self._worker = worker
        self._msg = msg
        self._state = state
        self._heartbeat: concurrent.futures.Future[None] | None = None
        self._progress: concurrent.futures.Future[None] | None = None
        self._reported_at = -float("inf")  # time.monotonic() of the last progress write
        self._progress_failing = False
        self.cancelled = ""  # why, once the job's state says cancelled: the node stops the run and settles it so
        self._lock = threading.Lock()  # _state and finished: the node's loop reports, the run's thread finishes
        self.finished = False

    @property
    def job_id(self) -> str:
        return self.request.job_id

    @property
    def max_deliver(self) -> int:
        """Deliveries the server makes of a job: past it, a job handed back is never delivered again."""
        return self._worker.config.max_deliver

    def progress(self) -> None:
        """Tell the server now that the job is still being worked on (the heartbeat does it regularly)."""
        self._worker.client.run(self._msg.in_progress())

    def report(self, frames: int, frames_total: int | None, frames_per_s: float) -> None:
        """This attempt's progress, into the job's state for `fleet jobs`, at most every
        jobs.status_interval_s. Returns at once (the write happens on the client's loop); a report
        made while the last one is still being written is folded into the next. Written only over
        this attempt's own "running" state."""
        now = time.monotonic()
        with self._lock:
            if self.finished:
                return
            self._state = replace(self._state, frames=frames, frames_total=frames_total,
                                  frames_per_s=round(frames_per_s, 2), updated_at=time.time())
            due = now - self._reported_at >= self._worker.config.status_interval_s
            if due and (self._progress is None or self._progress.done()):
                self._reported_at = now
                self._progress = self._worker.client.spawn(self._write_progress(self._state))

    async def _write_progress(self, state: JobState) -> None:
        try:
            stored = await _write_state(self._worker.kv, state, _still_running)
            if stored is not None and stored.state == "cancelled":
                self.cancelled = stored.error or "cancelled"
        except (*UNAVAILABLE, nats.errors.Error, FleetError) as exc:  # the next report tries again
            if not self._progress_failing:  # once an outage, not every report
                log.info("job %s: progress not stored (%s)", self.job_id, exc)
            self._progress_failing = True
        else:
            self._progress_failing = False

    def done(self, frames: int | None = None) -> bool:
        """The job's results are durable (`frames` of them, when given): mark it done and acknowledge
        it (confirmed by the server). False when a later attempt holds the job (this node was cut off
        past ack_wait_s): nothing is written nor acknowledged, since the server would take this
        delivery's ack for the later one's. False too when the job was cancelled meanwhile (`cancelled`):
        its state stays so and the delivery is terminated."""
        self._finish(frames)
        return self._worker.client.run(self._done())

    def fail(self, error: str, retry: bool = False, frames: int | None = None) -> bool:
        """Give the job up (state failed, never delivered again), or with retry ask for another delivery now,
        with `frames` stored when given. False, and nothing done, when a later attempt holds the job;
        False, the delivery terminated, when the job was cancelled (as done())."""
        self._finish(frames)
        return self._worker.client.run(self._fail(error, retry))

    def _finish(self, frames: int | None = None) -> None:
        with self._lock:
            if self.finished:
                raise RuntimeError(f"job {self.job_id} already finished")
            self.finished = True
            self._state = replace(self._state, frames_per_s=0.0,
                                  frames=self._state.frames if frames is None else frames)
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._msg.in_progress()
            except (*UNAVAILABLE, nats.errors.Error) as exc:
                log.info("job %s: progress not sent (%s)", self.job_id, exc)

    def settle_cancelled(self, frames: int | None = None) -> None:
        """The job was cancelled (`cancelled`): end this delivery for good (whichever attempt holds
        the job: it is over). The cancel wrote the state; where it stopped (`frames` stored, when
        given) goes into it while it still names this attempt (`_record_where_it_stopped`)."""
        self._finish(frames)
        self._worker.client.run(self._settle(None, self._msg.term, "cancelled"))

    async def _settle(self, state: JobState | None, settle: Callable[[], Awaitable[Any]], what: str) -> bool:
        """Store this attempt's end state, then settle the delivery; False, and nothing settled, when a
        later attempt holds the job. A cancelled job keeps its state and its delivery is terminated
        (never delivered again). Both retried through a leader election: until ack_wait runs out the
        delivery is still ours."""
        budget = self._worker.config.ack_wait_s
        if state is not None:
            stored = await retrying(lambda: _write_state(self._worker.kv, state, _not_later_nor_cancelled), budget,
                                    f"job {self.job_id}: state")
            if stored is not None and stored.state == "cancelled" and stored.attempt <= self.attempt:
                self.cancelled, settle, what = stored.error or "cancelled", self._msg.term, "cancelled"
            elif stored is not None:
                return self._superseded(what)
        await retrying(settle, budget, f"job {self.job_id}: {what}")
        if what == "cancelled":
            log.info("job %s: attempt %d ended, the job cancelled", self.job_id, self.attempt)
            await self._record_where_it_stopped(budget)
        return not self.cancelled  # settled as asked

    async def _record_where_it_stopped(self, budget: float) -> None:
        """This attempt's last figures (frames stored, earlier attempts' included) into the cancelled
        state: the cancel kept those of the last progress write, and the run went on until its node
        found the cancel. Only over a cancelled state that names this attempt on this node, never
        turning it into another; a failure leaves the cancel's figures (the job is over all the same)."""
        mine = self._state

        def figures(current: JobState | None) -> JobState | None:
            if current is None or (current.state, current.attempt, current.node) != ("cancelled", mine.attempt,
                                                                                     mine.node):
                return None
            total = current.frames_total if mine.frames_total is None else mine.frames_total
            if (current.frames, current.frames_total, current.frames_per_s) == (mine.frames, total, 0.0):
                return None
            return replace(current, frames=mine.frames, frames_total=total, frames_per_s=0.0, updated_at=time.time())

        try:
            await retrying(lambda: _change_state(self._worker.kv, self.job_id, figures), budget,
                           f"job {self.job_id}: state")
        except (*UNAVAILABLE, nats.errors.Error, FleetError) as exc:
            log.info("job %s: where the cancelled attempt stopped (%d frames) not stored (%s)", self.job_id,
                     mine.frames, exc)

    async def _done(self) -> bool:
        timeout = self._worker.client.config.nats.request_timeout_s
        return await self._settle(replace(self._state, state="done", updated_at=time.time()),
                                  lambda: self._msg.ack_sync(timeout=timeout), "done")

    async def _fail(self, error: str, retry: bool) -> bool:
        state = replace(self._state, state="queued" if retry else "failed", error=error, updated_at=time.time())
        return await self._settle(state, self._msg.nak if retry else self._msg.term,
                                  "handed back" if retry else "failed")

    def _superseded(self, what: str) -> bool:
        # The server settles a work-queue message by its stream sequence, whichever delivery the ack
        # came from: this late one would settle the later attempt's, and a job whose later attempt
        # then dies would never come back.
        log.warning("job %s: attempt %d %s after a later attempt took the job: not acknowledged, the later "
                    "attempt settles it", self.job_id, self.attempt, what)
        return False


RECLAIM_EVERY_S = 0.5  # how often a node checks the jobs of departed nodes while any is unsettled


@dataclass(frozen=True)
class _Departed:
    node: str
    instance: str
    jobs: tuple[str, ...]
    seen_at: float  # time.time() when its presence was seen gone


class JobWorker:
    """One node's side of the job queue: `take()` the next job, within whatever capacity the node has."""

    def __init__(self, client: FleetClient, node: str, instance: str = "") -> None:
        self.client = client
        self.config: JobsConfig = client.config.jobs
        self.node = node
        self.instance = instance or secrets.token_hex(6)  # the node's LeaseManager.instance, where it has one
        self.kv: KeyValue
        self._psub: Any = None
        self._departed: dict[tuple[str, str], _Departed] = {}
        self._reclaiming: concurrent.futures.Future[tuple[list[str], list[tuple[str, str]]]] | None = None
        self._reclaim_due = 0.0  # time.monotonic() when the next check may start

    def take(self, timeout_s: float = 1.0) -> Job | None:
        """The next job, marked running on this node; None when none came within timeout_s."""
        limit = timeout_s + 2 * self.client.config.nats.request_timeout_s
        return self.client.run(self._take(timeout_s), timeout_s=limit)

    def reclaim(self, departed: Sequence[NodeInfo], live: Mapping[str, str],
                answered_for: float = math.inf) -> list[str]:
        """Hand back, for delivery now, the jobs of node starts that are gone, rather than leave them to
        the server's ack_wait_s. `departed`: presences that left the view (LeaseManager.departed(),
        the jobs they named); `live`: node name -> instance of the presences there now. Call it every
        turn of the node's loop: it returns at once, the checks run on the client's loop, and it
        returns the jobs handed back since the last call.

        A job goes back when its state still names that start as running it, its holder has not come
        back to the view, its state has not been written for stale_s (a live holder writes its progress
        every status_interval_s: a presence lost in a leader election is no death) and the server's own
        redelivery is not near (see `_reclaim_one`). Who hands it back is decided by compare-and-set on
        the state (`queued`, with why), so that one node of all that saw the departure sends the NAK.

        `answered_for`: seconds since a write of this node last went unanswered (LeaseManager.answered_for()).
        Within stale_s of that, no job is handed back: what silenced this node's writes (a leader election,
        a server's death) silenced the holders' too, and their presences and states may lapse together
        while they live; they write again once it is over, and come back to the view."""
        for info in departed:
            if info.jobs and (info.name, info.instance) != (self.node, self.instance):
                self._departed.setdefault((info.name, info.instance), _Departed(info.name, info.instance,
                                                                                info.jobs, time.time()))
        handed: list[str] = []
        running = self._reclaiming
        if running is not None and running.done():
            self._reclaiming = None
            try:
                handed, settled = running.result()
            except (FleetError, *UNAVAILABLE, nats.errors.Error) as exc:  # checked again at the next turn
                log.info("node %s: jobs of departed nodes not checked (%s)", self.node, exc)
            else:
                for key in settled:
                    self._departed.pop(key, None)
        for key, gone in list(self._departed.items()):
            # back in the view (a presence write that was late), or past the window: nothing to do
            if live.get(gone.node) == gone.instance or time.time() - gone.seen_at > self.config.ack_wait_s:
                del self._departed[key]
        now = time.monotonic()
        if (self._departed and self._reclaiming is None and now >= self._reclaim_due
                and answered_for >= self._stale_s()):
            self._reclaim_due = now + RECLAIM_EVERY_S
            self._reclaiming = self.client.spawn(self._reclaim(list(self._departed.values())))
        return handed

    def close(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            try:
                self.client.run(psub.unsubscribe(), timeout_s=self.client.config.nats.request_timeout_s)
            except FleetError:
                pass

    async def _take(self, timeout_s: float) -> Job | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            msg = await self._next(left)
            if msg is None:
                return None
            job = await self._claim(msg)
            if job is not None:
                return job
        return None

    async def _next(self, timeout_s: float) -> Msg | None:
        """The next delivery, unclaimed; None when none came within timeout_s."""
        if self._psub is None:
            await self._state_kv()
            self._psub = await self.client.js.pull_subscribe_bind(durable=self.config.consumer,
                                                                  stream=self.config.stream)
        try:
            msgs = await self._psub.fetch(1, timeout=max(timeout_s, 0.01))
        except UNAVAILABLE:
            return None
        return msgs[0]

    def _stale_s(self) -> float:
        """How long a running job's state must go unwritten before its holder counts as gone: a live node
        writes it every status_interval_s, and renews its presence within the lease TTL."""
        return max(self.client.config.leases.ttl_s, 2 * self.config.status_interval_s)

    async def _state_kv(self) -> KeyValue:
        if not hasattr(self, "kv"):
            self.kv = await _ensure(self.client)
        return self.kv

    async def _reclaim(self, departed: list[_Departed]) -> tuple[list[str], list[tuple[str, str]]]:
        """(jobs handed back, departed starts with nothing left to check)."""
        kv = await self._state_kv()
        handed: list[str] = []
        settled: list[tuple[str, str]] = []
        for gone in departed:
            outcomes = [await self._reclaim_one(kv, job_id, gone) for job_id in gone.jobs]
            handed += [job_id for job_id, outcome in zip(gone.jobs, outcomes) if outcome in ("handed back", "failed")]
            if "wait" not in outcomes:
                settled.append((gone.node, gone.instance))
        return handed, settled

    async def _reclaim_one(self, kv: KeyValue, job_id: str, gone: _Departed) -> str:
        """"handed back", "failed" (that was its last allowed delivery: failed for good and terminated,
        as hand_back does), "wait" (its state is still being written: check again), or "settled" (not
        this start's any more, or left to the server).

        The NAK goes to the holder's delivery by its acknowledgement subject, and the server takes it
        for whichever delivery of the message is pending: sent after the server had delivered the
        job again on its own, it would start a third attempt beside the second. The server's own
        redelivery comes ack_wait_s after the holder's last heartbeat, which was at most
        progress_interval_s before its last state write: the job is left to the server unless that
        write is younger than ack_wait_s less two progress intervals. (Were one sent late all the
        same, the attempt it started would store no result twice, results.py.)"""
        stale_s = self._stale_s()
        window_s = self.config.ack_wait_s - 2 * self.config.progress_interval_s
        outcome = "settled"

        def handed_back(current: JobState | None) -> JobState | None:
            nonlocal outcome
            outcome = "settled"
            if (current is None or current.state != "running" or (current.node, current.instance) != (
                    gone.node, gone.instance) or not current.reply.startswith("$JS.ACK.")):
                return None
            age = time.time() - current.updated_at
            if age >= window_s:
                return None
            if age < stale_s:
                outcome = "wait"
                return None
            why = f"its node {gone.node} is gone (seen by {self.node})"
            if current.attempt >= self.config.max_deliver:  # the server delivers it no more: over, as hand_back does
                outcome = "failed"
                return replace(current, state="failed", frames_per_s=0.0, updated_at=time.time(),
                               error=f"gave up after {current.attempt} attempts, the last: {why}")
            outcome = "handed back"
            return replace(current, state="queued", frames_per_s=0.0, updated_at=time.time(), error=why)

        stored, written = await _change_state(kv, job_id, handed_back)
        if not written:
            return outcome
        assert stored is not None
        settle = b"+TERM" if outcome == "failed" else b"-NAK"
        try:
            await self.client.nc.request(stored.reply, settle, timeout=self.client.config.nats.request_timeout_s)
        except (*UNAVAILABLE, nats.errors.Error) as exc:
            # the state says queued; the server delivers it again after ack_wait_s all the same
            log.info("node %s: job %s of departed node %s: the hand-back not confirmed (%s)", self.node, job_id,
                     gone.node, exc)
            return outcome
        log.info("node %s: job %s %s: its node %s (start %s) is gone, its state silent for %.1f s", self.node, job_id,
                 "handed back" if outcome == "handed back" else f"failed (its attempt {stored.attempt} was the last)",
                 gone.node, gone.instance, time.time() - stored.updated_at)
        return outcome

    async def _claim(self, msg: Msg) -> Job | None:
        """Mark a delivery's job running on this node and hold it; None when there is nothing to run."""
        try:
            request = records.unpack(JobRequest, msg.data, f"{self.config.subject} message")
        except records.RecordError as exc:
            log.warning("dropping a malformed job message: %s", exc)
            await msg.term()
            return None
        attempt = msg.metadata.num_delivered
        state = JobState(request.job_id, request.input, "running", self.node, attempt,
                         submitted_at=request.submitted_at, updated_at=time.time(), instance=self.instance,
                         reply=msg.reply)
        stored = await _write_state(self.kv, state, _not_ended)
        if stored is not None and stored.state in ENDED:
            # Another attempt ended the job after the server gave up waiting on it (its node was slow or
            # cut off past ack_wait_s) and before this write, or its acknowledgement was lost: its results
            # are durable, or it failed for good. Running it again would undo that; settle it as it did.
            log.info("job %s: attempt %d already %s by node %s: not run again", request.job_id, stored.attempt,
                     stored.state, stored.node or "?")
            await (msg.ack() if stored.state == "done" else msg.term())
            return None
        if stored is not None:
            log.info("job %s: attempt %d is stale, a later one exists", request.job_id, attempt)
        job = Job(self, msg, request, state)
        job._heartbeat = self.client.spawn(job._beat(self.config.progress_interval_s))
        return job
