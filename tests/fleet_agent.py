"""A fleet participant in its own process, for tests that SIGKILL it (tests/test_fleet_*.py).

    python -m tests.fleet_agent CONFIG.yaml lease NODE CAPACITY   # holds cameras; prints "ACQUIRED <name>"
    python -m tests.fleet_agent CONFIG.yaml job NODE [FRAMES]     # takes one job, publishes results of its
                                                                  # first FRAMES frames, never finishes it;
                                                                  # prints "TOOK <job id> <attempt>", "PUBLISHED"
    python -m tests.fleet_agent CONFIG.yaml jobnode NODE           # as a node holds a job: in the fleet (its
                                                                  # presence names the job), its progress
                                                                  # written; prints "TOOK <job id> <attempt>"

It prints "READY" once it is in the fleet, then one line per event, flushed, and runs until killed.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from maskstream.pipeline.config import load_config
from maskstream.pipeline.fleet.config import FleetConfig
from maskstream.pipeline.fleet.connection import FleetClient
from maskstream.pipeline.fleet.jobs import JobWorker
from maskstream.pipeline.fleet.leases import LeaseManager
from maskstream.pipeline.fleet.results import ResultPublisher

from tests.make_detections import make_detections


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    config = load_config(FleetConfig, argv[0])
    role, node = argv[1], argv[2]
    client = FleetClient.connect(config, name=node)
    if role == "lease":
        manager = LeaseManager(client, node, int(argv[3]))
        manager.start()
        say("READY")
        while True:
            for event in manager.events(timeout_s=1.0):
                say(f"{event.kind.upper()} {event.camera.name}")
    elif role == "job":
        worker = JobWorker(client, node)
        say("READY")
        job = None
        while job is None:
            job = worker.take(timeout_s=1.0)
        say(f"TOOK {job.job_id} {job.attempt}")
        publisher = ResultPublisher(client)
        for seq in range(int(argv[3]) if len(argv) > 3 else 0):
            publisher.publish(make_detections(job.request.stream_id, seq)[0])
        say("PUBLISHED")
        while True:  # holds the job, heartbeating, until killed
            time.sleep(1)
    elif role == "jobnode":
        manager = LeaseManager(client, node, 0)
        manager.start()
        worker = JobWorker(client, node, manager.instance)
        say("READY")
        job = None
        while job is None:
            job = worker.take(timeout_s=1.0)
        manager.set_jobs([job.job_id])
        say(f"TOOK {job.job_id} {job.attempt}")
        frames = 0
        while True:  # holds the job, heartbeating and writing its progress as a node's loop does, until killed
            frames += 1
            job.report(frames, None, 10.0)
            time.sleep(0.1)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])


class Agent:
    """A fleet_agent subprocess, read line by line with deadlines; kill() is SIGKILL."""

    def __init__(self, *args: str) -> None:
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fleet_agent", *args], cwd=root,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._pending: list[str] = []
        self._partial = b""

    def expect(self, prefix: str, timeout_s: float) -> str:
        """The next line starting with prefix (every line read is kept in self.lines)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while True:
            while self._pending:
                line = self._pending.pop(0)
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} line from the agent in {timeout_s} s; got {self.lines}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise AssertionError(f"agent exited ({self.proc.wait()}) before {prefix!r}:\n{stderr[-3000:]}")
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for raw in lines:
                self.lines.append(raw.decode().strip())
                self._pending.append(self.lines[-1])

    def kill(self) -> float:
        """SIGKILL; returns time.monotonic() right after the signal was sent."""
        self.proc.kill()
        killed = time.monotonic()
        self.proc.wait()
        return killed

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
