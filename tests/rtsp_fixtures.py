"""The `rtsp_server` fixture: a real GStreamer RTSP server (tests/rtsp_server.py) in a subprocess.

    def test_x(rtsp_server):
        server = rtsp_server(DATA / "videos" / "car-detection.mp4", loop=True)
        server.url      # rtsp://127.0.0.1:PORT/stream, already listening
        server.kill()   # SIGKILL, like a crashed camera
        server.start()  # again, on the same port

The server runs under the system Python, which has PyGObject; `make rtsp-server-deps`
installs the Debian packages. Without them, tests using the fixture skip and say so.
"""

from __future__ import annotations

import functools
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The Debian python3 that the gir1.2/python3-gi packages belong to, not the venv's.
SYSTEM_PYTHON = os.environ.get("MASKSTREAM_RTSP_PYTHON", "/usr/bin/python3")
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
READY_TIMEOUT_S = 15.0


@functools.cache
def rtsp_server_missing() -> str | None:
    """Why the RTSP server cannot run here, or None when it can."""
    check = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        result = subprocess.run([SYSTEM_PYTHON, "-c", check], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON} cannot run ({exc})"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return f"GStreamer RTSP server not installed for {SYSTEM_PYTHON} ({last}); run `make rtsp-server-deps`"
    return None


class RtspServer:
    """One server process serving `video` at self.url; start/stop/kill/start again."""

    def __init__(self, video: Path, loop: bool = False) -> None:
        self.video, self.loop = Path(video), loop
        self.port = 0  # 0 until the first start picked a free one; restarts reuse it
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    def start(self) -> str:
        assert self._proc is None, "already running"
        args = [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.video), "--port", str(self.port)]
        self._proc = subprocess.Popen(
            [*args, "--loop"] if self.loop else args, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        line = self._wait_ready()
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        return self.url

    def _wait_ready(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=0.1):
                    line = self._proc.stdout.readline()
                    if line.startswith("READY "):
                        return line.strip()
                    if not line:  # the server exited
                        break
        self.stop()
        self._log.seek(0)
        raise RuntimeError(f"RTSP server for {self.video} did not become ready:\n{self._log.read()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a word, like a crashed or unplugged camera."""
        self._end(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: the connection stays open but nothing more arrives."""
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            if sig != signal.SIGKILL:
                os.kill(proc.pid, signal.SIGCONT)  # a frozen server must run to handle SIGTERM
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        self.stop()
        self._log.close()


@pytest.fixture
def rtsp_server() -> Iterator[Callable[..., RtspServer]]:
    """A factory: rtsp_server(video, loop=False) -> a started RtspServer; all stopped at teardown."""
    missing = rtsp_server_missing()
    if missing:
        pytest.skip(missing)
    servers: list[RtspServer] = []

    def start(video: Path, loop: bool = False) -> RtspServer:
        server = RtspServer(video, loop)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()
