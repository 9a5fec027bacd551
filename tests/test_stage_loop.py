"""The stage loop's own process behaviour, over real sockets in a real spawned process."""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from maskstream.pipeline.runtime.messages import Frame, Header, LostFrame, StageReport, StageStamp
from maskstream.pipeline.runtime.stage import BlackBox, Source, Stage, Wiring, run_stage
from maskstream.pipeline.runtime.supervisor import StageSpec, Supervisor
from maskstream.pipeline.runtime.transport import Outbox, ReportInbox, pack
from maskstream.pipeline.stages.decode import DecodeStage
from maskstream.pipeline.stages.infer import InferStage
from maskstream.pipeline.stages.postprocess import PostprocessStage
from maskstream.pipeline.stages.preprocess import PreprocessStage
from maskstream.pipeline.stages.publish import PublishStage

HEARTBEAT_S = 0.2


class Idle(Stage):
    def process(self, message):
        return None


class SlowToMake:
    """A stage that takes `seconds` to make, as a model that loads and compiles at start does."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self) -> Idle:
        time.sleep(self.seconds)
        return Idle()


class BusyForAMinute(Stage):
    """Sleeps a minute in process() (a long forward); marks its files so that a test sees it got
    there and that close() ran. swallow: catches everything, BaseException included, as a careless
    library might."""

    def __init__(self, folder: Path, swallow: bool):
        self.folder, self.swallow = folder, swallow

    def process(self, message):
        (self.folder / "inside").touch()
        if not self.swallow:
            time.sleep(60)
            return None
        try:
            time.sleep(60)
        except BaseException:  # noqa: B036 - the point of this stage
            pass
        return None

    def close(self):
        (self.folder / "closed").touch()


class Echo(Stage):
    def process(self, message):
        return [message]


def test_the_stage_protocol_declares_every_hook_the_loop_calls_with_defaults():
    """run_stage calls these directly (no getattr): a stage overrides only what it uses."""
    stage, frame = Echo(), Frame(Header("s", 0), np.zeros((1, 1, 3), np.uint8))
    assert stage.flush() == () and stage.idle_timeout_s is None and stage.live_streams == ()
    assert stage.overtaken(frame) == [frame] and stage.progress() == () and stage.close() is None
    # explicit subclasses, so they inherit the defaults (issubclass needs a runtime-checkable protocol)
    assert all(Stage in cls.__mro__ for cls in (PreprocessStage, InferStage, PostprocessStage, PublishStage))
    assert Source in DecodeStage.__mro__


def _start(tmp_path, make_seconds: float):
    inbox = ReportInbox(f"ipc://{tmp_path}/reports")
    wiring = Wiring(stage="slow.0", reports=f"ipc://{tmp_path}/reports", inbox=f"ipc://{tmp_path}/inbox",
                    heartbeat_s=HEARTBEAT_S, parent_pid=os.getpid())
    process = multiprocessing.get_context("spawn").Process(target=run_stage, args=(SlowToMake(make_seconds), wiring))
    process.start()
    return inbox, process


def _reports_until(inbox: ReportInbox, done, timeout_s: float = 30.0) -> list[StageReport]:
    reports: list[StageReport] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not done(reports):
        reports += [report for report, _ in inbox.recv_all(0.1)]
    assert done(reports), f"gave up after {timeout_s} s with {reports}"
    return reports


def test_a_stage_being_made_reports_starting_then_ready(tmp_path):
    """While it is made the stage sends heartbeats marked `starting` (so a supervisor neither kills
    it as hung nor takes it for ready); once made, its reports are plain ones."""
    inbox, process = _start(tmp_path, make_seconds=2.0)
    try:
        reports = _reports_until(inbox, lambda rs: any(not r.starting for r in rs))
        first_ready = next(i for i, r in enumerate(reports) if not r.starting)
        # ~2 s of making at 0.2 s beats, less the process's own start-up (imports) before them.
        assert sum(r.starting for r in reports[:first_ready]) >= 3
        assert all(r.pid == process.pid and r.stage == "slow.0" and not r.fatal for r in reports)
    finally:
        process.terminate()
        process.join(10)
        inbox.close()
    assert process.exitcode == 0


def test_a_stage_stopped_while_being_made_exits_cleanly_without_a_fatal_report(tmp_path):
    inbox, process = _start(tmp_path, make_seconds=60.0)
    try:
        _reports_until(inbox, lambda rs: sum(r.starting for r in rs) >= 2)
        process.terminate()  # the supervisor stopping the run during a long start
        process.join(10)
        assert process.exitcode == 0  # at once, not after the minute of making
        assert not any(report.fatal for report, _ in inbox.recv_all(0.5))
    finally:
        if process.is_alive():
            process.kill()
        inbox.close()


def test_the_supervisor_holds_the_sources_until_inference_reports_ready():
    """A `starting` heartbeat keeps the inference stage alive in the supervisor's eyes, but the
    decoders start only on its first plain report (after its model is made and warmed up)."""
    supervisor = Supervisor([], "ipc:///nonexistent", ())
    assert not supervisor.inference_ready()
    supervisor.latest["infer.0"] = StageReport("infer.0", 7, 1.0, starting=True)
    assert not supervisor.inference_ready()
    supervisor.latest["infer.0"] = StageReport("infer.0", 7, 1.5)
    assert supervisor.inference_ready()


def test_held_sources_are_given_per_stream_and_replace_the_decoders_configs():
    """hold_sources: the decoders wait for give_sources(), which must name each stream once."""
    decoder = StageSpec(print, "placeholder source", Wiring("decode.cam", "ipc:///nonexistent"), stream_id="cam")
    supervisor = Supervisor([decoder], "ipc:///nonexistent", ("cam",), hold_sources=True)
    assert not supervisor.sources_given
    with pytest.raises(ValueError, match="cam"):
        supervisor.give_sources({"other": "the camera's source"})
    assert not supervisor.sources_given and supervisor.specs["decode.cam"].config == "placeholder source"
    supervisor.give_sources({"cam": "the camera's source"})
    assert supervisor.sources_given and supervisor.specs["decode.cam"].config == "the camera's source"
    assert Supervisor([decoder], "ipc:///nonexistent", ("cam",)).sources_given  # not held: at once


class Worker(Stage):
    """Works 2 s on frame 0 (in pure Python, as a forward's Python glue holds the GIL), chokes on
    frame 1, kills its process on frame 2."""

    def process(self, message):
        if message.header.seq == 1:
            raise ValueError("bad frame")
        if message.header.seq == 2:
            os._exit(3)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pass
        return None


class MakeWorker:
    def __call__(self) -> Worker:
        return Worker()


def _frame(seq: int) -> Frame:
    stamp = StageStamp("source", 100.0 + seq, 100.0 + seq)
    return Frame(Header("s", seq, None, (stamp,)), np.zeros((2, 2, 3), np.uint8))


def test_heartbeats_go_on_during_long_work_saying_what_lost_frames_are_reported_and_the_black_box_names_the_last(
        tmp_path):
    context = multiprocessing.get_context("spawn")
    box = BlackBox(context)
    inbox = ReportInbox(f"ipc://{tmp_path}/reports")
    wiring = Wiring(stage="work.0", reports=f"ipc://{tmp_path}/reports", inbox=f"ipc://{tmp_path}/inbox",
                    heartbeat_s=HEARTBEAT_S, parent_pid=os.getpid(), blackbox=box)
    process = context.Process(target=run_stage, args=(MakeWorker(), wiring))
    process.start()
    outbox = Outbox([wiring.inbox], hwm=4)
    try:
        _reports_until(inbox, lambda rs: any(not r.starting for r in rs))
        outbox.send(pack(_frame(0))[0], block=True)
        reports = _reports_until(inbox, lambda rs: sum(r.working_on == "Frame s#0" for r in rs) >= 5)
        working = [r for r in reports if r.working_on == "Frame s#0"]
        assert len({r.working_since for r in working}) == 1 and working[0].working_since > 0
        outbox.send(pack(_frame(1))[0], block=True)
        reports = _reports_until(inbox, lambda rs: any(r.lost for r in rs))
        [lost] = next(r.lost for r in reports if r.lost)
        assert lost == LostFrame("s", 1, 101.0, "work.0: ValueError: bad frame")
        assert reports[-1].errors == 1 and reports[-1].received == 2
        outbox.send(pack(_frame(2))[0], block=True)
        process.join(30)
        assert process.exitcode == 3 and box.read() == ("s", 2, 102.0)  # what it died on, no heartbeat needed
    finally:
        outbox.close()
        if process.is_alive():
            process.kill()
        inbox.close()


def test_the_black_box_is_empty_while_idle_and_keeps_long_stream_ids_whole():
    box = BlackBox(multiprocessing.get_context("spawn"))
    assert box.read() is None
    box.write(("camera-" + "x" * 100, 12345678901, 3.25))
    assert box.read() == ("camera-" + "x" * 100, 12345678901, 3.25)
    box.write(None)
    assert box.read() is None


@pytest.mark.parametrize("swallow", [False, True], ids=["plain", "swallowing-stage"])
def test_sigterm_inside_process_stops_the_stage_at_once_and_runs_close(tmp_path, swallow):
    """SIGTERM while process() works: the per-message error handling (which logs and skips a message
    whose processing raises) must not take the stop for an error and serve on; a stage that itself
    swallows the stop's exception still leaves as soon as process() returns."""
    inbox = ReportInbox(f"ipc://{tmp_path}/reports")
    wiring = Wiring(stage="busy.0", reports=f"ipc://{tmp_path}/reports", inbox=f"ipc://{tmp_path}/inbox",
                    heartbeat_s=HEARTBEAT_S, parent_pid=os.getpid())
    make = functools.partial(BusyForAMinute, tmp_path, swallow)
    process = multiprocessing.get_context("spawn").Process(target=run_stage, args=(make, wiring))
    process.start()
    outbox = Outbox([wiring.inbox], hwm=4)
    try:
        frames, _ = pack(Frame(Header("s", 0), np.zeros((4, 4, 3), np.uint8)))
        assert outbox.send(frames, block=True)
        deadline = time.monotonic() + 60
        while not (tmp_path / "inside").exists():
            assert time.monotonic() < deadline and process.is_alive(), "the stage never got into process()"
            time.sleep(0.05)
        time.sleep(0.2)  # well inside the sleep
        stopped_at = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        process.join(15)
        took = time.monotonic() - stopped_at
        assert not process.is_alive(), "SIGTERM inside process() was swallowed: the stage serves on"
    finally:
        if process.is_alive():
            process.kill()
            process.join()
        outbox.close()
        inbox.close()
    assert process.exitcode == 0
    assert took < 5.0  # the minute of process() is cut short; only the process's own exit remains
    assert (tmp_path / "closed").exists(), "close() did not run"
