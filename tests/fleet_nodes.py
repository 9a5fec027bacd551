"""`maskstream node` processes and a results reader, for the fleet node tests (tests/test_fleet_node*.py).

    node = NodeProcess("a", config_path, tmp_path, capacity=2)   # `maskstream node` with the tiny model
    node.wait_ready()
    node.kill()                                                  # SIGKILL; returns time.time() of the kill
    collector = ResultCollector(fleet_config)                    # every result stored, with its arrival time
    collector.messages("cam0")                                   # [(arrival time.time(), message), ...]

A node runs the tiny untrained model of tests/pipeline_runs.py (deterministic, ~0.1 s a frame),
logs to tmp_path/node-NAME.log and serves its metrics on a free port.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from maskstream.pipeline.fleet.config import FleetConfig
from maskstream.pipeline.fleet.results import Published, ResultSubscriber
from maskstream.pipeline.runtime.messages import Detections, EndOfStream

from tests.nats_cluster import free_ports
from tests.pipeline_runs import ROOT, TINY_MODEL_SETS


def maskstream(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`maskstream ARGS` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "maskstream.pipeline.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


class NodeProcess:
    def __init__(self, name: str, config: Path, tmp_path: Path, capacity: int, *extra: str) -> None:
        self.name = name
        self.metrics_port = free_ports(1)[0]
        self.log = tmp_path / f"node-{name}.log"
        restarts = 1
        while self.log.exists():  # a node started again under its name: a log of its own
            restarts += 1
            self.log = tmp_path / f"node-{name}.{restarts}.log"
        sets = [x for s in TINY_MODEL_SETS for x in ("--set", s)]
        cmd = [sys.executable, "-m", "maskstream.pipeline.cli", "node", "--fleet-config", str(config), "--name", name,
               "--capacity", str(capacity), "--metrics-port", str(self.metrics_port), "--status-interval", "0.5",
               *sets, *extra]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60) -> None:
        self.wait_for_log("in the fleet at", timeout_s)

    def wait_for_log(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if text in line:
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in node {self.name}'s log within {timeout_s} s:\n{self.tail()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    def kill(self) -> float:
        """SIGKILL: a crashed host. Returns time.time() right after the signal."""
        self.proc.kill()
        killed = time.time()
        self.proc.wait()
        return killed

    def terminate(self, timeout_s: float) -> int:
        """SIGTERM (the node drains) and wait for its exit status."""
        self.proc.terminate()
        return self.proc.wait(timeout=timeout_s)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ResultCollector:
    """Reads the whole results stream from its first message, in a thread, until close()."""

    def __init__(self, config: FleetConfig) -> None:
        self._sub = ResultSubscriber.connect(config, from_seq=1, name="test-collector")
        self._lock = threading.Lock()
        self._got: list[tuple[float, Published]] = []
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    message = self._sub.recv(timeout_s=0.5)
                except TimeoutError:
                    continue
                with self._lock:
                    self._got.append((time.time(), message))
        except BaseException as exc:  # noqa: BLE001  (reported by the test that reads)
            self.error = exc

    def messages(self, stream: str) -> list[tuple[float, Published]]:
        if self.error is not None:
            raise AssertionError(f"the results reader failed: {self.error!r}")
        with self._lock:
            return [(at, m) for at, m in self._got if m.header.stream_id == stream]

    def wait(self, stream: str, predicate, timeout_s: float, what: str) -> list[tuple[float, Published]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.messages(stream)
            if predicate(got):
                return got
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout_s} s; {stream} has {len(self.messages(stream))} results")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sub.close()


def runs_of(messages: list[tuple[float, Published]]) -> list[list[tuple[float, Published]]]:
    """A camera's results split into its runs: each run counts seq from 0 again (a new node, a restart)."""
    runs: list[list[tuple[float, Published]]] = []
    last = None
    for at, message in messages:
        seq = message.header.seq
        if last is None or seq < last or isinstance(runs[-1][-1][1], EndOfStream):
            runs.append([])
        runs[-1].append((at, message))
        last = seq
    return runs


def check_every_frame_published_or_counted(run: list[tuple[float, Published]]) -> None:
    """Within one run of a live camera: seqs rise; a gap between two results is exactly the frames
    the pipeline counted as dropped in between; an EndOfStream's seq is one past the last frame."""
    previous = None
    for _, message in run:
        if previous is not None:
            assert message.header.seq > previous.header.seq or isinstance(message, EndOfStream)
            gap = message.header.seq - previous.header.seq - 1
            counted = sum(n for _, n in message.header.drops) - sum(n for _, n in previous.header.drops)
            assert gap == counted, (previous.header, message.header)
        elif isinstance(message, Detections):
            assert message.header.seq == sum(n for _, n in message.header.drops)  # the frames before the first
        previous = message
