"""`maskstream node`: one host's share of the fleet's cameras and jobs.

A node holds up to `capacity` pipelines at once, cameras and jobs together. Its loop:

- cameras: a `LeaseManager` claims them (only those whose requirements its labels satisfy, spread
  by capacity, docs/fleet.md); each `acquired` starts a live pipeline run (runs.PipelineRun)
  published under the camera's name with the lease revision as epoch; `lost` stops it at once,
  silently (another node may run it already); `released` (the camera was removed, or now requires
  labels this node lacks) and `updated` (its URL or options changed) stop it with an EndOfStream
  saying why, `updated` then starts it again. A camera whose pipeline ends or fails is started
  again after a backoff, as a new epoch. A camera's options are `maskstream run`'s `source.*`
  settings (`policy` defaults to live);
- jobs: with a slot free and no camera it could run waiting for a node, it takes a job from the
  work queue and runs it with the offline policy, resuming after what an earlier attempt stored;
  the run acknowledges it once its EndOfStream is stored (runs.py). The lease manager is offered
  only the slots that jobs leave free;
- status: every `status_interval_s` each camera's frames/s, frames, drops and last error go into
  its lease, and the jobs it runs into its presence record (`fleet status`, `fleet jobs`);
- hung pipelines: a camera's, job's or standby's pipeline process that sent no status message for
  `hung_timeout_s` (counted on the loop's own clock) is SIGKILLed with its stages; the camera
  restarts after its backoff, the job is handed back, the standby made again;
- metrics: `metrics_text()` in Prometheus' text format (pipeline.runtime.metrics);
- drain (`drain()`, from SIGTERM/SIGINT): it takes nothing more, ends its cameras' streams and
  releases their leases at once (others claim them without waiting for the TTL), lets its jobs
  finish for up to `drain_timeout_s`, then hands the others back (another node resumes them
  after their stored results). A second drain() hands everything back at once.

Only the CLI prints or exits: `run()` returns when the node is drained, and raises when the
fleet cannot be reached or the lease manager fails.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from maskstream.pipeline.fleet.connection import FleetClient, FleetError
from maskstream.pipeline.fleet.jobs import Job, JobWorker, ensure_jobs
from maskstream.pipeline.fleet.leases import (
    Camera,
    CameraStatus,
    LeaseEvent,
    LeaseManager,
    NodeNameInUse,
    check_labels,
    check_name,
)
from maskstream.pipeline.fleet.results import ResultPublisher, ensure_results_stream
from maskstream.pipeline.fleet.runs import (
    STANDBY_STREAM,
    STANDBY_URL,
    PipelineRun,
    RunSpec,
    Spare,
    hand_back,
    standby_config,
)
from maskstream.pipeline.runtime.messages import EndOfStream
from maskstream.pipeline.runtime.metrics import MetricsSnapshot, Sample, render_prometheus

if TYPE_CHECKING:
    from maskstream.pipeline.run_config import ChosenModel, RunConfig

__all__ = ["Node", "NodeSettings", "camera_run_config", "check_socket_paths", "job_run_config"]

log = logging.getLogger(__name__)

TICK_S = 0.2
SPARE_AFTER_S = 5.0  # a spare taken is replaced this long after, not while its run starts up beside it
# A slot a finished job frees is taken by the next queued job within a tick or two: a standby
# starts only in room that stays free this long, not in every gap between two jobs.
ROOM_SETTLE_S = 1.0
# A turn of the loop counts at most this much towards a pipeline's silence (runs.Silence): after a
# late turn (the node held up by an overloaded or frozen host) its pipelines get time to speak.
TURN_COUNTED_S = 1.0
NODE_FOLDER_PREFIX = "maskstream-node-"
RUNS_CHECKED = 10**9 - 1  # the node's run endpoints are checked at start up to this many runs' names


@dataclass(frozen=True)
class NodeSettings:
    name: str
    capacity: int  # pipelines at once: cameras and jobs together
    run: RunConfig  # what every pipeline starts from: model, workers, transport, supervisor, source defaults
    status_interval_s: float = 1.0
    restart_backoff_s: tuple[float, float] = (1.0, 30.0)  # a failed camera's first and longest wait
    drain_timeout_s: float = 30.0  # jobs still running this long after a drain began are handed back
    stop_timeout_s: float = 20.0  # a stopped pipeline gets this long to exit, then SIGKILL
    endpoint_dir: Path | None = None  # where the runs' ipc:// sockets go (None: system temp)
    # A pipeline process started ahead, its imports done, for the next camera or job: a camera that
    # fails over starts that much sooner. Costs one idle process.
    spare: bool = True
    # Camera pipelines started ahead (every stage but the decoder; the model loaded and warmed up),
    # up to this many and never more than the node's free room, while the fleet has cameras this
    # node could run (stopped when it has none): each camera this node acquires (those failing over from a dead
    # node among them) takes one over, paying one decoder's start instead of a pipeline's. Each
    # costs an idle pipeline (its processes and a copy of the model); 0: none.
    standby: int = 1
    # A standby not ready (its model loaded and warmed up) this long after its start is taken for
    # hung (a model load that never ends, a wedged stage, a stopped process) and stopped: it would
    # hold back every standby after it. Far above a pipeline's cold start on a loaded CPU host and a
    # torch.compile on a GPU (docs/fleet.md gives the figures), and the supervisor's own allowance
    # for a stage's first heartbeat (SupervisorConfig.start_timeout_s): too short a limit kills a
    # slow start over and over, too long a one only leaves the node without a warm standby longer.
    standby_ready_timeout_s: float = 300.0
    standby_retry_s: float = 30.0  # a standby that died unused or was stopped as hung is made again this long after
    # A pipeline process (a camera's, a job's, a standby's) that sent no status message for this
    # long (it sends one every runs.PROGRESS_EVERY_S from its supervisor's loop) is taken for hung
    # (stopped, deadlocked, swapped out) and SIGKILLed with its stages: a camera is started again
    # after its backoff, a job handed back, a standby made again after standby_retry_s. Counted on
    # the node's loop clock (runs.Silence), from the process's first status message (before it,
    # a run has its supervisor's start_timeout_s, a standby standby_ready_timeout_s). Far above
    # the longest pause between two turns of a supervisor's loop on a loaded host (docs/fleet.md
    # gives the figures): too short a limit kills slow pipelines, too long a one leaves a hung
    # camera dark, a hung job held by this node, that much longer.
    hung_timeout_s: float = 30.0
    log_level: str = "warning"  # the pipelines' stage processes (pipeline.logs)
    model: ChosenModel | None = None  # run_config.choose_model(run.model), fetched once by the caller
    # What this host offers (site=lobby, gpu=yes): it claims only cameras whose requirements all match these
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name("node name", self.name)
        check_labels("labels", self.labels)
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"capacity: expected a number of pipelines >= 1, got {self.capacity!r}")
        first, longest = self.restart_backoff_s
        if not 0 < first <= longest:
            raise ValueError(f"restart_backoff_s: expected 0 < first <= longest, got {self.restart_backoff_s}")
        if isinstance(self.standby, bool) or not isinstance(self.standby, int) or self.standby < 0:
            raise ValueError(f"standby: expected a number of pipelines >= 0, got {self.standby!r}")
        for name in ("status_interval_s", "drain_timeout_s", "stop_timeout_s", "standby_ready_timeout_s",
                     "hung_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number of seconds")
        if not self.standby_retry_s >= 0:
            raise ValueError("standby_retry_s: expected a number of seconds >= 0")


def check_socket_paths(run: RunConfig, endpoint_dir: Path | None) -> None:
    """ValueError (naming the path and the limit) when an ipc:// socket the node or its pipelines
    would make is too long: refused at the node's start, where a pipeline would fail at every start."""
    from maskstream.pipeline.run_config import check_run_sockets, check_socket_folder

    check_socket_folder(endpoint_dir, NODE_FOLDER_PREFIX, [_endpoint_name(RUNS_CHECKED)])
    check_run_sockets(run)


def _endpoint_name(run: int) -> str:
    return f"run{run}.pub"


def camera_run_config(base: RunConfig, camera: Camera, endpoint: str) -> RunConfig:
    """The pipeline settings of one camera: its URL, live unless its options say otherwise, its
    options as `source.*` settings (ConfigError for an unknown one), results on `endpoint` only."""
    from maskstream.pipeline.config import dump_config, loads_config
    from maskstream.pipeline.run_config import OutputOptions, SourceOptions

    source = dataclasses.replace(base.source, policy="live")
    if camera.options:
        items = [f"{key}={value}" for key, value in sorted(camera.options.items())]
        source = loads_config(SourceOptions, dump_config(source), items, source=f"camera {camera.name!r} options")
    # Stopped, it stops at once: the node stops forwarding first and ends the stream itself, saying why.
    supervisor = dataclasses.replace(base.supervisor, live_drain_timeout_s=0.0)
    return dataclasses.replace(base, sources=(camera.url,), source=source, outputs=OutputOptions(publish=endpoint),
                               supervisor=supervisor)


def job_run_config(base: RunConfig, source: str, endpoint: str) -> RunConfig:
    """The pipeline settings of one job: its input read offline (every frame), results on `endpoint` only."""
    from maskstream.pipeline.run_config import OutputOptions

    return dataclasses.replace(base, sources=(source,), source=dataclasses.replace(base.source, policy="offline"),
                               outputs=OutputOptions(publish=endpoint))


@dataclass
class _CameraSlot:
    camera: Camera
    revision: int
    run: PipelineRun | None = None
    restarts: int = 0
    start_at: float = 0.0  # time.monotonic() of the next start (after a failure)
    backoff_s: float = 0.0


class Node:
    """One host's node. `Node(client, settings).run()` until drained (see the module docstring)."""

    def __init__(self, client: FleetClient, settings: NodeSettings) -> None:
        self.client = client
        self.settings = settings
        self.publisher = ResultPublisher(client)
        self.manager: LeaseManager | None = None
        self.worker: JobWorker | None = None
        self.cameras: dict[str, _CameraSlot] = {}
        self.jobs: dict[str, PipelineRun] = {}
        self.stopping: list[PipelineRun] = []  # stopped runs whose processes have not exited yet
        self.counters = {name: 0 for name in (
            "leases_acquired", "leases_lost", "leases_released", "camera_restarts", "standby_takeovers", "jobs_taken",
            "job_redeliveries", "jobs_done", "jobs_failed", "jobs_handed_back", "jobs_cancelled", "results",
            "pipelines_hung", "jobs_reclaimed")}
        self._drains = 0
        self._drain_began: float | None = None
        self._leases_released = False
        self._runs = 0
        self._status_at = 0.0
        self._endpoint_dir: Path | None = None
        self._settled: set[int] = set()  # the jobs runs whose outcome was counted (by id)
        self._spare: Spare | None = None
        self._spare_due = 0.0  # time.monotonic() when the next spare may start
        self._standbys: list[Spare] = []  # oldest first
        self._spares_stopping: list[Spare] = []  # stopped unused, not exited yet
        self._standby_due = 0.0  # time.monotonic() when the next standby may start
        self._room_free_since: float | None = None  # room beyond the standbys free since then
        self._clock = 0.0  # the loop clock the pipelines' silence is counted on (runs.Silence)
        self._turn_at: float | None = None  # time.monotonic() of the last turn's start

    # ------------------------------------------------------------------ public

    def drain(self) -> None:
        """Stop taking work and give back what is held (safe from a signal handler: it only counts)."""
        self._drains += 1

    def run(self) -> None:
        settings = self.settings
        check_socket_paths(settings.run, settings.endpoint_dir)
        ensure_results_stream(self.client)
        ensure_jobs(self.client)
        from maskstream.pipeline.run_config import run_folder

        # with an owner file, as a run's: remove_dead_runs clears it after a SIGKILL
        self._endpoint_dir = run_folder(settings.endpoint_dir, prefix=NODE_FOLDER_PREFIX)
        self.manager = LeaseManager(self.client, settings.name, settings.capacity, settings.labels)
        self.worker = JobWorker(self.client, settings.name, self.manager.instance)
        self.manager.start()
        try:
            while not self._done():
                self._step()
        finally:
            self._close()

    def metrics_text(self) -> str:
        """The node's metrics in Prometheus' text format."""
        state = self.client.state()
        held = len(self.manager.held()) if self.manager is not None else 0
        gauge, counter = "gauge", "counter"
        samples = [
            Sample("maskstream_node_capacity", "Pipelines this node runs at most (cameras and jobs).", gauge, "",
                   self.settings.capacity),
            Sample("maskstream_node_streams", "Pipelines running on this node (cameras and jobs).", gauge, "",
                   sum(1 for s in self.cameras.values() if s.run is not None) + len(self.jobs)),
            Sample("maskstream_node_jobs", "Offline jobs running on this node.", gauge, "", len(self.jobs)),
            Sample("maskstream_node_leases_held", "Camera leases this node holds.", gauge, "", held),
            Sample("maskstream_node_standby_ready", "Warm standby pipelines waiting for a camera.", gauge, "",
                   self._standbys_ready()),
            Sample("maskstream_node_draining", "1 while the node drains (stops taking work).", gauge, "",
                   int(self._drains > 0)),
            Sample("maskstream_nats_connected", "1 while the node is connected to a NATS server.", gauge, "",
                   int(state.connected)),
            Sample("maskstream_nats_reconnects_total", "Reconnections to the NATS cluster.", counter, "",
                   state.reconnects),
            Sample("maskstream_nats_disconnects_total", "Disconnections from the NATS cluster.", counter, "",
                   state.disconnects),
        ]
        helps = {
            "leases_acquired": "Camera leases this node acquired.",
            "leases_lost": "Camera leases this node lost (another node took over, or not renewed in time).",
            "leases_released": "Camera leases this node gave back (camera removed, node draining).",
            "camera_restarts": "Camera pipelines started again after they ended or failed.",
            "standby_takeovers": "Camera runs started on the warm standby pipeline.",
            "jobs_taken": "Offline jobs this node took from the work queue.",
            "job_redeliveries": "Jobs this node took that an earlier attempt had not finished.",
            "jobs_done": "Jobs this node finished and acknowledged.",
            "jobs_failed": "Jobs this node failed for good.",
            "jobs_handed_back": "Jobs this node handed back for another delivery.",
            "jobs_cancelled": "Jobs this node stopped (or did not run) because they were cancelled.",
            "jobs_reclaimed": "Jobs of departed nodes this node handed back for delivery at once.",
            "results": "Results (Detections, EndOfStream) this node's runs stored on NATS.",
            "pipelines_hung": "Pipeline processes (cameras', jobs', standbys') SIGKILLed as hung: silent too long.",
        }
        for key, help_text in helps.items():
            value = self.counters[key] + (sum(run.status().results for run in self._runs_alive())
                                          if key == "results" else 0)
            samples.append(Sample(f"maskstream_node_{key}_total", help_text, counter, "", value))
        for name, slot in sorted(self.cameras.items()):
            if slot.run is None:
                continue
            status = slot.run.status()
            samples += [
                Sample("maskstream_node_stream_frames_per_second", "Frames/s published, last few seconds.", gauge,
                       name, round(status.frames_per_s, 3)),
                Sample("maskstream_node_stream_dropped_frames", "Frames the stream's current run dropped.", gauge,
                       name, status.drops),
            ]
        snapshot = MetricsSnapshot("node", 0, time.time(), tuple(samples))
        return render_prometheus([snapshot])

    # ------------------------------------------------------------------ the loop

    def _step(self) -> None:
        manager = self.manager
        assert manager is not None
        if isinstance(manager.error, NodeNameInUse):
            raise manager.error  # the operator's to fix, said as it is
        if manager.error is not None:
            raise FleetError(f"lease manager failed: {manager.error}")
        turn_at = time.monotonic()
        if self._turn_at is not None:
            self._clock += min(turn_at - self._turn_at, TURN_COUNTED_S)
        self._turn_at = turn_at
        draining = self._drains > 0  # read once: a signal may count another drain any time
        if draining and self._drain_began is None:
            self._begin_drain()
        take = not draining and self._room() > 0 and not manager.unclaimed()
        for event in manager.events(timeout_s=0.0 if take else TICK_S):
            if not self._leases_released:  # after release_all: the releases it made itself
                self._on_lease(event, time.monotonic())
        assert self.worker is not None
        self.counters["jobs_reclaimed"] += len(self.worker.reclaim(manager.departed(), manager.live_nodes(),
                                                                   manager.answered_for()))
        now = time.monotonic()
        self._poll_runs(now)
        if draining:
            self._drain_step(now)
        elif take and self._room() > 0:
            self._take_job()  # waits up to TICK_S for one
        if now - self._status_at >= self.settings.status_interval_s:
            self._status_at = now
            self._report()
        if self.settings.spare and self._spare is None and now >= self._spare_due and not draining:
            self._spare = Spare()
        if self.settings.standby and not draining:
            self._keep_standbys(now)
        # read by every node's claim plan: free cameras go to warm standbys first
        manager.set_ready(0 if draining else self._standbys_ready())
        self._reap_spares(now)

    def _standbys_ready(self) -> int:
        """Standbys alive and seen ready. By ready_at, which the node's loop sets, not by reading their
        pipes: the metrics thread calls this too, and only the loop reads them."""
        return sum(1 for standby in list(self._standbys) if standby.alive and standby.ready_at is not None)

    def _keep_standbys(self, now: float) -> None:
        """Up to settings.standby warm pipelines, none beyond the free room, while cameras could come
        to this node; one that died unused, went silent (hung) or was not ready in time is made again later."""
        retry_s = self.settings.standby_retry_s
        for standby in list(self._standbys):
            if not standby.alive:
                self._standbys.remove(standby)
                standby.close()
                self._pipeline_exited(standby.process.exitcode)
                self._standby_due = now + retry_s
                log.warning("node %s: a standby pipeline (pid %s) exited unused (code %s); another in %.0f s",
                            self.settings.name, standby.process.pid, standby.process.exitcode, retry_s)
                continue
            heard, seen_ready = standby.silence.heard, standby.ready_at is not None
            silent_s = standby.silent_s(self._clock)  # reads what it said, "ready" among it
            if silent_s > self.settings.hung_timeout_s:
                # SIGKILLed at once (a stopped process never runs its SIGTERM handler), its stages with it
                self._standbys.remove(standby)
                standby.kill()
                self.counters["pipelines_hung"] += 1
                self._spares_stopping.append(standby)
                self._standby_due = now + retry_s
                log.warning("node %s: a standby pipeline (pid %s) sent nothing for %.0f s: hung, SIGKILLed; "
                            "another in %.0f s", self.settings.name, standby.process.pid, silent_s, retry_s)
                continue
            if not heard and standby.silence.heard:
                log.info("node %s: standby pipeline (pid %s) running %.1f s after its start, its model loading",
                         self.settings.name, standby.process.pid, now - standby.started_at)
            if standby.ready:
                if not seen_ready and standby.ready_at is not None:  # what --standby-ready-timeout is sized by
                    log.info("node %s: standby pipeline (pid %s) ready %.1f s after its start", self.settings.name,
                             standby.process.pid, standby.ready_at - standby.started_at)
            elif now - standby.started_at > self.settings.standby_ready_timeout_s:
                # it holds back every standby after it (they start one at a time), and cannot be
                # taken over warm: stopped without waiting for it, SIGKILLed by _reap_spares if need be
                self._standbys.remove(standby)
                standby.stop()
                self._spares_stopping.append(standby)
                self._standby_due = now + retry_s
                log.warning("node %s: a standby pipeline (pid %s) was not ready within %.0f s of its start: "
                            "stopped as hung; another in %.0f s", self.settings.name, standby.process.pid,
                            self.settings.standby_ready_timeout_s, retry_s)
        manager = self.manager
        cameras = manager.camera_count() if manager is not None else 0
        room = self._room()
        wanted = min(self.settings.standby, room) if cameras > 0 else 0
        while len(self._standbys) > max(0, wanted):  # the newest first: the least warm
            standby = self._standbys.pop()
            standby.stop()
            self._spares_stopping.append(standby)
            log.info("node %s: standby pipeline stopped (%s)", self.settings.name,
                     "no cameras in the fleet" if cameras == 0 else "no room for it")
        if len(self._standbys) >= wanted:
            self._room_free_since = None
            return
        if self._room_free_since is None:
            self._room_free_since = now
        # one at a time: a standby starting competes with the ones before it for the cores
        if (now - self._room_free_since >= ROOM_SETTLE_S and now >= self._standby_due
                and all(standby.ready for standby in self._standbys)):
            config = standby_config(camera_run_config(self.settings.run, Camera(STANDBY_STREAM, STANDBY_URL),
                                                      self._endpoint()))
            standby = Spare(standby=self._spec("camera", STANDBY_STREAM, config))
            self._standbys.append(standby)
            log.info("node %s: standby pipeline %d of %d starting (pid %s)", self.settings.name, len(self._standbys),
                     wanted, standby.process.pid)

    def _reap_spares(self, now: float) -> None:
        """Forget the stopped spares that exited; SIGKILL those that did not within stop_timeout_s
        (a process stopped or hung in native code never runs its SIGTERM handler)."""
        for spare in self._spares_stopping:
            stopped_at = spare.stopped_at if spare.stopped_at is not None else now
            if not spare.killed and spare.alive and now - stopped_at > self.settings.stop_timeout_s:
                log.warning("node %s: an unused pipeline (pid %s) did not exit within %.0f s of its stop: SIGKILL",
                            self.settings.name, spare.process.pid, self.settings.stop_timeout_s)
                spare.kill()
        for spare in self._spares_stopping:
            if not spare.alive:
                self._pipeline_exited(spare.process.exitcode)
        self._spares_stopping = [spare for spare in self._spares_stopping if spare.alive]

    def _take_spare(self) -> Spare | None:
        spare, self._spare = self._spare, None
        self._spare_due = time.monotonic() + SPARE_AFTER_S
        return spare

    def _take_standby(self, config: RunConfig) -> tuple[RunConfig, Spare | None]:
        """A standby pipeline a camera run of `config` fits, a ready one first (config then publishing
        on its endpoint), else the plain spare."""
        fitting = [standby for standby in self._standbys if standby.alive and standby.fits(config)]
        if not fitting:
            return config, self._take_spare()
        standby = max(fitting, key=lambda standby: standby.ready)
        assert standby.standby is not None
        self._standbys.remove(standby)
        self._standby_due = time.monotonic() + SPARE_AFTER_S
        self.counters["standby_takeovers"] += 1
        return dataclasses.replace(config, outputs=standby.standby.config.outputs), standby

    def _room(self) -> int:
        return self.settings.capacity - len(self.cameras) - len(self.jobs)

    def _on_lease(self, event: LeaseEvent, now: float) -> None:
        name = event.camera.name
        slot = self.cameras.get(name)
        if event.kind == "acquired":
            self.counters["leases_acquired"] += 1
            if slot is not None:  # a lease lost and won back before its run stopped
                self._stop_camera(slot, "lease acquired again", end_stream=False)
            slot = self.cameras[name] = _CameraSlot(event.camera, event.revision)
            if self._drains == 0:
                self._start_camera(slot, now)
            return
        if slot is None:
            return
        if event.kind == "lost":
            self.counters["leases_lost"] += 1
            self._stop_camera(slot, f"lease lost: {event.reason}", end_stream=False)
            del self.cameras[name]
        elif event.kind == "released":
            self.counters["leases_released"] += 1
            self._stop_camera(slot, event.reason, end_stream=True)
            del self.cameras[name]
        elif event.kind == "updated":
            self._stop_camera(slot, "camera updated: URL or options changed", end_stream=True)
            slot.camera, slot.backoff_s = event.camera, 0.0
            slot.restarts += 1
            self._start_camera(slot, now)

    def _start_camera(self, slot: _CameraSlot, now: float) -> None:
        endpoint = self._endpoint()
        epoch = str(slot.revision) if slot.restarts == 0 else f"{slot.revision}-{slot.restarts}"
        try:
            config = camera_run_config(self.settings.run, slot.camera, endpoint)
        except ValueError as exc:  # a bad option: reported in the camera's status, tried again later
            self._camera_failed(slot, now, str(exc))
            return
        config, spare = self._take_standby(config)
        run = PipelineRun(self._spec("camera", slot.camera.name, config, epoch=epoch), self.publisher,
                          stop_timeout_s=self.settings.stop_timeout_s)
        slot.run = run
        run.start(spare)
        log.info("node %s: camera %s started (epoch %s%s, pid %s)", self.settings.name, slot.camera.name, epoch,
                 ", on the standby pipeline" if spare is not None and spare.standby is not None else "", run.pid)

    def _stop_camera(self, slot: _CameraSlot, reason: str, end_stream: bool) -> None:
        run, slot.run = slot.run, None
        if run is not None:
            # a lease lost means another node may run the camera now: worth a warning
            log.log(logging.INFO if end_stream else logging.WARNING, "node %s: camera %s stopped (%s)",
                    self.settings.name, slot.camera.name, reason)
            run.stop(reason, end_stream=end_stream)
            self.stopping.append(run)

    def _camera_failed(self, slot: _CameraSlot, now: float, error: str) -> None:
        first, longest = self.settings.restart_backoff_s
        slot.backoff_s = min(longest, slot.backoff_s * 2) if slot.backoff_s else first
        slot.start_at = now + slot.backoff_s
        slot.restarts += 1
        if self.manager is not None:
            self.manager.report(slot.camera.name, CameraStatus(last_error=error))
        log.warning("node %s: camera %s: %s; starting it again in %.1f s", self.settings.name, slot.camera.name,
                    error, slot.backoff_s)

    def _poll_runs(self, now: float) -> None:
        for slot in list(self.cameras.values()):
            run = slot.run
            if run is None:
                if not self._drains and now >= slot.start_at:
                    self.counters["camera_restarts"] += 1
                    self._start_camera(slot, now)
                continue
            if run.poll():  # it ended or failed by itself
                slot.run = None
                self._retire(run)
                if now - run.started_at > 60:
                    slot.backoff_s = 0.0  # it ran a good while: a fresh failure starts the backoff again
                self._camera_failed(slot, now, run.status().last_error or f"pipeline ended ({run.outcome})")
            else:
                self._kill_if_hung(run, f"camera {slot.camera.name}")
        for job_id, run in list(self.jobs.items()):
            if run.job is not None and run.job.cancelled:  # its state said so at its last progress write
                run.stop(run.job.cancelled)
            finished = run.poll()
            if not finished and run.forwarding:
                self._kill_if_hung(run, f"job {job_id}")
            if finished or not run.forwarding:
                # settled (acknowledged, failed or handed back): its slot is free while its pipeline exits
                del self.jobs[job_id]
                self._job_finished(run)
                if finished:
                    self._retire(run)
                else:
                    self.stopping.append(run)
        for run in list(self.stopping):
            finished = run.poll()
            if run.job is not None and not run.forwarding:
                self._job_finished(run)
            if finished:
                self.stopping.remove(run)
                self._retire(run)

    def _kill_if_hung(self, run: PipelineRun, what: str) -> None:
        """SIGKILL a run's pipeline silent past hung_timeout_s, without waiting: its forwarding thread
        sees it gone and ends the run as on any pipeline's death (the camera fails and starts again
        after its backoff; the job is handed back), in a later turn."""
        why = run.hung(self._clock, self.settings.hung_timeout_s)
        if why:
            log.warning("node %s: %s: %s (pid %s); SIGKILLed", self.settings.name, what, why, run.pid)
            run.kill_hung(why)
            self.counters["pipelines_hung"] += 1

    def _retire(self, run: PipelineRun) -> None:
        self.counters["results"] += run.status().results
        self._settled.discard(id(run))
        self._pipeline_exited(run.exitcode)

    def _pipeline_exited(self, exitcode: int | None) -> None:
        """A pipeline process killed by a signal (SIGKILL, the OOM killer) could not remove its rings
        (shared memory: RAM) and socket folder: removed now, not left until the node's next start."""
        if exitcode is None or exitcode >= 0:
            return
        from maskstream.pipeline.run_config import remove_dead_runs

        leftovers = remove_dead_runs(self.settings.run.transport.endpoint_dir)
        if leftovers:
            log.info("node %s: a pipeline killed (signal %d): removed %s", self.settings.name, -exitcode,
                     leftovers.describe())

    def _take_job(self) -> None:
        worker = self.worker
        assert worker is not None
        try:
            job = worker.take(timeout_s=TICK_S)
        except FleetError as exc:
            log.info("node %s: no job taken (%s)", self.settings.name, exc)
            return
        if job is None:
            return
        self.counters["jobs_taken"] += 1
        if job.redelivered:
            self.counters["job_redeliveries"] += 1
        try:
            self._start_job(job)
        except (FleetError, ValueError, OSError) as exc:
            log.warning("node %s: job %s not started: %s", self.settings.name, job.job_id, exc)
            try:
                outcome = hand_back(job, f"not started on {self.settings.name}: {exc}")
                if outcome != "superseded":
                    self.counters["jobs_handed_back" if outcome == "released" else "jobs_failed"] += 1
            except FleetError:
                pass  # delivered again after ack_wait_s
        self._jobs_changed()

    def _start_job(self, job: Job) -> None:
        stored = self.publisher.last_stored(job.request.stream_id)
        last = None if stored is None else stored[1]
        if isinstance(last, EndOfStream):  # an earlier attempt stored everything and died before its ack
            if job.fail(last.error) if last.error else job.done(frames=last.header.seq):
                self.counters["jobs_failed" if last.error else "jobs_done"] += 1
            return
        config = job_run_config(self.settings.run, job.request.input, self._endpoint())
        skip = last.header.seq if last is not None else None
        run = PipelineRun(self._spec("job", job.request.stream_id, config, skip_through=skip,
                                     stored_through=0 if stored is None else stored[0]),
                          self.publisher, job, stop_timeout_s=self.settings.stop_timeout_s)
        self.jobs[job.job_id] = run
        job.report(0 if skip is None else skip + 1, None, 0.0)  # the claim wrote 0: what is stored is more
        run.start(self._take_spare())
        log.info("node %s: job %s (attempt %d) started%s (pid %s)", self.settings.name, job.job_id, job.attempt,
                 f", after seq {skip}" if skip is not None else "", run.pid)

    def _job_finished(self, run: PipelineRun) -> None:
        if id(run) in self._settled:
            return
        self._settled.add(id(run))
        key = {"done": "jobs_done", "failed": "jobs_failed", "released": "jobs_handed_back",
               "cancelled": "jobs_cancelled"}.get(run.outcome)
        if key is not None:
            self.counters[key] += 1
        assert run.job is not None
        log.info("node %s: job %s %s", self.settings.name, run.job.job_id, run.outcome)
        self._jobs_changed()

    def _jobs_changed(self) -> None:
        """Offer the lease manager the slots the jobs leave, and name the jobs in the presence record."""
        if self.manager is None:
            return
        if not self._drains:
            self.manager.set_capacity(max(0, self.settings.capacity - len(self.jobs)))
        self.manager.set_jobs(sorted(self.jobs))

    def _report(self) -> None:
        manager = self.manager
        if manager is None:
            return
        for name, slot in self.cameras.items():
            if slot.run is None:
                continue
            status = slot.run.status()
            manager.report(name, CameraStatus(round(status.frames_per_s, 2), status.frames, status.drops,
                                              status.last_error))
        manager.set_jobs(sorted(self.jobs))
        for run in self.jobs.values():
            if run.job is not None:
                run.job.report(*run.job_progress())

    # ------------------------------------------------------------------ draining

    def _begin_drain(self) -> None:
        self._drain_began = time.monotonic()
        log.info("node %s: draining", self.settings.name)
        if self.manager is not None:
            self.manager.set_capacity(0)
        for slot in self.cameras.values():
            self._stop_camera(slot, "node stopping", end_stream=True)

    def _drain_step(self, now: float) -> None:
        assert self._drain_began is not None
        if not self._leases_released:
            # the cameras' EndOfStreams are out (their forwarding threads are done): give the leases back
            forwarding = [run for run in self.stopping if run.job is None and run.forwarding]
            if not forwarding or now - self._drain_began > self.settings.stop_timeout_s:
                assert self.manager is not None
                try:
                    self.manager.release_all("node stopping")
                except FleetError as exc:  # not acknowledged: the leases expire after ttl_s
                    log.warning("node %s: leases not released (%s)", self.settings.name, exc)
                self._leases_released = True
                self.cameras.clear()
        if self.jobs and (self._drains > 1 or now - self._drain_began > self.settings.drain_timeout_s):
            for job_id, run in list(self.jobs.items()):
                run.stop("node stopping: handed back to the fleet")
                self.stopping.append(run)
                del self.jobs[job_id]

    def _done(self) -> bool:
        return self._leases_released and not self.jobs and not self.stopping

    def _close(self) -> None:
        for spare in (self._spare, *self._standbys, *self._spares_stopping):
            if spare is not None:
                spare.stop()
        for spare in (self._spare, *self._standbys, *self._spares_stopping):
            if spare is not None:
                spare.close()
        runs = [slot.run for slot in self.cameras.values() if slot.run is not None] + list(self.jobs.values())
        for run in runs:
            run.stop("node stopping", end_stream=run.job is None)
        self.stopping += runs
        deadline = time.monotonic() + self.settings.stop_timeout_s + 5
        while self.stopping and time.monotonic() < deadline:
            self.stopping = [run for run in self.stopping if not run.poll()]
            time.sleep(0.1)
        for run in self.stopping:
            run.kill()
        if self.manager is not None:
            self.manager.stop(release=True)
        if self.worker is not None:
            self.worker.close()
        if self._endpoint_dir is not None:
            for path in self._endpoint_dir.iterdir():
                path.unlink(missing_ok=True)
            self._endpoint_dir.rmdir()

    # ------------------------------------------------------------------ helpers

    def _spec(self, kind: Literal["camera", "job"], stream_id: str, config: RunConfig, epoch: str = "",
              skip_through: int | None = None, stored_through: int = 0) -> RunSpec:
        return RunSpec(kind, stream_id, config, epoch, skip_through, self.settings.log_level, self.settings.model,
                       stored_through)

    def _endpoint(self) -> str:
        assert self._endpoint_dir is not None
        self._runs += 1
        return f"ipc://{self._endpoint_dir / _endpoint_name(self._runs)}"

    def _runs_alive(self) -> list[PipelineRun]:
        cameras = [slot.run for slot in self.cameras.values() if slot.run is not None]
        return cameras + list(self.jobs.values()) + self.stopping
