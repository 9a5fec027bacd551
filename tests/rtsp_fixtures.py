"""The `rtsp_server` fixture: a real GStreamer RTSP server (tests/rtsp_server.py) in a subprocess.

    def test_x(rtsp_server):
        server = rtsp_server(DATA / "videos" / "car-detection.mp4", loop=True)
        server.url      # rtsp://127.0.0.1:PORT/stream, already listening
        server.kill()   # SIGKILL, like a crashed camera
        server.start()  # again, on the same port

The server runs under the system Python, which has PyGObject; `make rtsp-server-deps`
installs the Debian packages. Without them, tests using the fixture skip and say so.

`loop=True` serves a copy of the video repeated back to back for at least LOOP_S seconds
(`looped_copy`: the packets remuxed with shifted timestamps, nothing re-encoded), so a camera's
stream runs for the whole of a test with timestamps that keep increasing. The server once looped
by seeking its pipeline back at each segment's end instead; the first, flushing seek raced with
the server's own seek on PLAY and now and then left a new client's session silent until its
read timed out.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import pytest

# The Debian python3 that the gir1.2/python3-gi packages belong to, not the venv's.
SYSTEM_PYTHON = os.environ.get("MASKSTREAM_RTSP_PYTHON", "/usr/bin/python3")
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
READY_TIMEOUT_S = 15.0
# GStreamer's warnings, and each RTSP request and client's coming and going, in the server's log.
GST_DEBUG = "2,rtspclient:4,rtspmedia:4"
LOOP_S = 600.0  # a looped camera's stream lasts at least this long; after it, the stream ends


def looped_copy(video: Path, folder: Path, seconds: float = LOOP_S) -> Path:
    """`video`'s video track repeated back to back for at least `seconds`, remuxed into `folder`
    (made once per video and length: later calls return the same file)."""
    digest = hashlib.sha256(video.read_bytes()).hexdigest()[:16]
    out = folder / f"{video.stem}-{digest}-loop{int(seconds)}.mkv"
    if out.exists():
        return out
    partial = out.with_suffix(".partial.mkv")
    with av.open(str(video)) as source, av.open(str(partial), "w", format="matroska") as target:
        stream = source.streams.video[0]
        packets = [p for p in source.demux(stream) if p.size]
        if not packets or any(p.pts is None for p in packets):
            raise ValueError(f"{video}: looping needs a pts on every video packet")
        pts = [int(p.pts) for p in packets]  # decode order
        times = sorted(pts)
        # Decode timestamps made afresh (a container such as Matroska may store none, and the muxer
        # needs them): the presentation times in order, moved back by the largest reordering, so
        # each is at most its packet's pts and they increase.
        reorder = max(t - p for t, p in zip(times, pts))
        dts = [t - reorder for t in times]
        step = sorted(b - a for a, b in zip(times, times[1:]))[len(times) // 2 - 1] if len(times) > 1 else 1
        period = times[-1] - times[0] + step  # one pass of the file, in the stream's time base
        copies = max(1, -(-int(seconds / float(stream.time_base)) // period))  # ceil
        copy = target.add_stream_from_template(stream)
        for k in range(copies):
            for packet, p, d in zip(packets, pts, dts):
                shifted = av.Packet(bytes(packet))
                shifted.pts, shifted.dts = p + k * period, d + k * period
                shifted.time_base, shifted.is_keyframe, shifted.stream = stream.time_base, packet.is_keyframe, copy
                target.mux(shifted)
    partial.rename(out)
    return out


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

    def __init__(self, video: Path, loop: bool = False, log: Path | None = None) -> None:
        self.video = Path(video)
        self._served = looped_copy(self.video, _loops_folder()) if loop else self.video
        self.port = 0  # 0 until the first start picked a free one; restarts reuse it
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        # The server's stderr (GStreamer's warnings included): kept in `log` when given, so a
        # failed test's temporary folder shows what the camera saw.
        self._log = log.open("a+") if log is not None else tempfile.TemporaryFile(mode="w+")

    def start(self) -> str:
        assert self._proc is None, "already running"
        args = [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self._served), "--port", str(self.port)]
        self._proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, "GST_DEBUG": os.environ.get("GST_DEBUG", GST_DEBUG), "GST_DEBUG_NO_COLOR": "1"},
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


@functools.cache
def _loops_folder() -> Path:
    """Where looped copies are kept: one folder for the test session, removed at its end."""
    folder = tempfile.TemporaryDirectory(prefix="maskstream-rtsp-loops-")
    atexit.register(folder.cleanup)
    return Path(folder.name)


@pytest.fixture
def rtsp_server(tmp_path: Path) -> Iterator[Callable[..., RtspServer]]:
    """A factory: rtsp_server(video, loop=False) -> a started RtspServer; all stopped at teardown."""
    missing = rtsp_server_missing()
    if missing:
        pytest.skip(missing)
    servers: list[RtspServer] = []

    def start(video: Path, loop: bool = False) -> RtspServer:
        server = RtspServer(video, loop, log=tmp_path / f"rtsp-server-{len(servers)}.log")
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()
