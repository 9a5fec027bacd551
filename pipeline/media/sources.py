"""Video sources: open anything FFmpeg reads and yield decoded RGB frames.

    spec = SourceSpec("rtsp://cam/stream")          # or a file, http(s)/HLS URL, /dev/video0
    with VideoSource(spec) as source:               # opens (connects) here; source.info is set
        for frame in source:                        # DecodedFrame: index, pts_s, image, decoded_at, dropped_before
            ...
        source.stats                                # SourceStats: decoded, yielded, dropped_*, reconnects, ...

`source.read(timeout_s)` is the same as `next()` with a bound on the wait: it returns the next
frame, None at the end of the source, and raises TimeoutError when nothing came in time (so a
stage can send heartbeats while a camera is down).

`probe_source(spec)` opens a source once and decodes its first frame, before a run: SourceError
for one that cannot work (missing, a directory, not a video), a `Probe` otherwise (the frame count
an offline source will give; for a live camera out of reach now, why, as the run will retry it).

Two policies (`resolve_policy(url)` picks one when the spec does not):

offline (files; http(s) URLs, HLS playlists with an end)
    Every frame, in order, exactly once, decoded in the caller's thread; iteration ends at the
    end of the file. A packet the decoder rejects, or a file that ends before the frames its
    index lists, raises SourceError after the frames decoded before it, naming the file, the
    number of frames read and the byte position (approximate: frame threading reports a bad
    packet a few packets late): a damaged file is never silently shortened. (A file whose
    index gives no frame count, such as most .mkv, can only be caught by decode errors.) A missing
    or non-video file raises SourceError when opened. Frame threading (thread_type AUTO) is on.

live (rtsp://, rtmp://, srt://, udp://, ..., live HLS .m3u8 playlists, /dev/video* devices)
    A background thread decodes continuously (so nothing piles up in server or socket buffers)
    into a one-slot buffer where the latest frame wins; each read returns the newest frame.
    A frame replaced before it was taken, or older than staleness_s when taken, is dropped and
    counted; `index` keeps counting dropped frames, so every drop shows as a gap, and
    `dropped_before` says how big the gap before each frame is. The end of a live stream is a
    disconnect (PyAV ends an RTSP stream quietly when the server dies), as are no frame for
    stall_timeout_s, a read error, a refused connection: the thread reconnects with exponential
    backoff and `index` continues. After max_reconnects attempts in a row that brought no
    frame, reads raise SourceError naming the URL and the last error. Packets the decoder
    rejects (UDP loss) are skipped and counted. Staleness is measured from decode time: if the
    decoder itself cannot keep up with the camera, the lag before decoding is not seen here
    (threading is FFmpeg's default SLICE, which adds no frame delay). A file read live is paced to its
    timestamps, like a camera (or to rate_fps, so a benchmark can play one file at any load), and ends
    at its end. close() returns within about half a
    second; a reader blocked in a network read exits by itself after its read timeout
    (stall_timeout_s / 2) and closes its connection then.

Devices need an FFmpeg with the v4l2 input: PyAV's binary wheels do not have it (they are built
without libavdevice's v4l2), so a device raises SourceError saying so unless PyAV is built
against the system's FFmpeg (`pip install av --no-binary av`). Device settings such as
`video_size`, `framerate` and `input_format` go in SourceSpec.options.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import av
import numpy as np
from maskstream.pipeline.media.hwdecode import hwaccel
from maskstream.pipeline.media.video import VideoError, VideoInfo, first_video_stream, stream_info

__all__ = [
    "DecodedFrame",
    "Policy",
    "Probe",
    "SourceError",
    "SourceSpec",
    "SourceStats",
    "VideoSource",
    "probe_source",
    "resolve_policy",
    "source_kind",
]

log = logging.getLogger("maskstream.sources")

Policy = Literal["offline", "live"]
SourceKind = Literal["file", "rtsp", "http", "hls", "device", "stream"]

# How long close() waits for the reader thread. A thread still blocked in a network read after
# this is left to finish on its own (it is a daemon, and its read timeout bounds the wait).
_CLOSE_JOIN_S = 0.5


class SourceError(VideoError):
    """A source cannot be opened or read; the message names the URL and what was wrong."""


@dataclass(frozen=True)
class SourceSpec:
    """Where frames come from and how to treat them (see the module docstring for the policies).

    options: extra FFmpeg options passed to av.open, applied last (e.g. {"video_size": "1280x720",
    "framerate": "30", "input_format": "mjpeg"} for a v4l2 device, {"headers": "..."} for http).
    """

    url: str
    policy: Policy | None = None  # None: resolve_policy(url)
    rate_fps: float | None = None  # a file read live: frames per second to play it at; None: its timestamps
    max_frames: int | None = None  # end the source after this many frames (a short benchmark); None: all
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    stall_timeout_s: float = 5.0  # live: no frame for this long = disconnected
    reconnect_backoff_s: tuple[float, float] = (0.5, 8.0)  # first and largest wait, doubling between
    max_reconnects: int | None = None  # attempts in a row without a frame; None: forever
    staleness_s: float = 0.5  # live: a frame older than this when taken is dropped
    options: dict[str, str] = field(default_factory=dict)
    # "nvdec": FFmpeg's CUDA hwaccel (pipeline.media.hwdecode: the run checked the device once, at start)
    decoder: Literal["cpu", "nvdec"] = "cpu"

    def __post_init__(self) -> None:
        first, largest = self.reconnect_backoff_s
        problems = [
            "url is empty" if not self.url else "",
            f"stall_timeout_s must be > 0, got {self.stall_timeout_s}" if not self.stall_timeout_s > 0 else "",
            f"staleness_s must be > 0, got {self.staleness_s}" if not self.staleness_s > 0 else "",
            f"rate_fps must be > 0 or None, got {self.rate_fps}"
            if self.rate_fps is not None and not self.rate_fps > 0
            else "",
            f"max_frames must be >= 1 or None, got {self.max_frames}"
            if self.max_frames is not None and self.max_frames < 1
            else "",
            f"reconnect_backoff_s must be 0 < first <= largest, got {self.reconnect_backoff_s}"
            if not 0 < first <= largest
            else "",
            f"max_reconnects must be >= 0 or None, got {self.max_reconnects}"
            if self.max_reconnects is not None and self.max_reconnects < 0
            else "",
            f"policy must be 'offline', 'live' or None, got {self.policy!r}"
            if self.policy not in ("offline", "live", None)
            else "",
            f"rtsp_transport must be 'tcp' or 'udp', got {self.rtsp_transport!r}"
            if self.rtsp_transport not in ("tcp", "udp")
            else "",
            f"decoder must be 'cpu' or 'nvdec', got {self.decoder!r}" if self.decoder not in ("cpu", "nvdec") else "",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(f"SourceSpec({self.url!r}): " + "; ".join(problems))


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame.

    index: decode order, 0-based, contiguous over the whole source including dropped frames and
    reconnects (so drops show as gaps). pts_s: presentation time in seconds, None when the
    stream has none (it restarts after a reconnect). image: uint8 [H, W, 3] RGB, C-contiguous.
    decoded_at: time.monotonic() when decoded. dropped_before: frames dropped since the previous
    yielded frame (always 0 offline)."""

    index: int
    pts_s: float | None
    image: np.ndarray
    decoded_at: float
    dropped_before: int = 0


@dataclass(frozen=True)
class SourceStats:
    """Counters of one VideoSource, a consistent snapshot."""

    decoded: int = 0
    yielded: int = 0
    dropped_replaced: int = 0  # live: overwritten in the one-slot buffer before being taken
    dropped_stale: int = 0  # live: older than staleness_s when taken
    reconnects: int = 0  # live: connection attempts after the first
    corrupt_packets: int = 0  # live: packets the decoder rejected and that were skipped
    last_error: str | None = None  # live: why the last connection ended or failed

    @property
    def dropped(self) -> int:
        return self.dropped_replaced + self.dropped_stale


def resolve_policy(url: str) -> Policy:
    """'offline' for files and http(s) URLs other than HLS playlists, 'live' for everything else.

    VideoSource refines HLS at open(): a playlist that ends (VOD) is read offline."""
    return "offline" if source_kind(url) in ("file", "http") else "live"


def source_kind(url: str) -> SourceKind:
    if url.startswith("/dev/"):
        return "device"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        return "file"
    if scheme in ("rtsp", "rtsps"):
        return "rtsp"
    if scheme in ("http", "https"):
        return "hls" if parts.path.lower().endswith(".m3u8") else "http"
    return "stream"


class VideoSource:
    """Frames of one source; a context manager and an iterator of DecodedFrame.

    Construction does nothing; open() (or `with`) opens the file or makes the first connection
    and sets .info (and .policy, for an HLS URL whose spec leaves it open). For a live source
    open() waits until connected, raising SourceError once max_reconnects attempts have failed,
    or TimeoutError after timeout_s (the reader keeps trying; open() may be called again).
    close() is idempotent; read() after close() returns None. interrupt() makes an open() or read()
    that waits on a live source (one reconnecting, say) return now, as at the source's end.

    convert turns a decoded av.VideoFrame into the yielded image, in the thread that reads;
    default: uint8 [H, W, 3] RGB in a fresh array. The decode stage passes one that writes the
    frame's planes straight into a shared-memory slot (pipeline.media.pixels).
    """

    def __init__(self, spec: SourceSpec | str, convert: Callable[[av.VideoFrame], np.ndarray] | None = None) -> None:
        self.spec = spec if isinstance(spec, SourceSpec) else SourceSpec(spec)
        self.convert = convert or _to_rgb
        self.policy: Policy = self.spec.policy or resolve_policy(self.spec.url)
        self.kind = source_kind(self.spec.url)
        self._reader: _OfflineReader | _LiveReader | None = None
        self._interrupted = False

    @property
    def info(self) -> VideoInfo | None:
        """The video stream of the current connection; None before open()."""
        return self._reader.info if self._reader else None

    @property
    def stats(self) -> SourceStats:
        return self._reader.stats() if self._reader else SourceStats()

    def open(self, timeout_s: float | None = None) -> VideoSource:
        if self._reader is None:
            _check_openable(self.spec.url, self.kind)
            if self.spec.policy is None and self.kind == "hls":
                self.policy = _hls_policy(self.spec)
            if self.policy == "offline":
                self._reader = _OfflineReader(self.spec, self.kind, self.convert)
            else:
                self._reader = _LiveReader(self.spec, self.kind, self.convert)
                self._reader.interrupted = self._interrupted
        if isinstance(self._reader, _LiveReader):
            self._reader.wait_connected(timeout_s)
        return self

    def read(self, timeout_s: float | None = None) -> DecodedFrame | None:
        """The next frame; None at the end of the source; TimeoutError if a live source gave
        nothing within timeout_s (offline reads never wait on a clock)."""
        if self._reader is None:
            self.open()
        assert self._reader is not None
        return self._reader.read(timeout_s)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def interrupt(self) -> None:
        """End the waits of a live source now (an offline one's reads do not wait): open() returns,
        read() gives None. It only sets flags, so a signal handler may call it."""
        self._interrupted = True
        if isinstance(self._reader, _LiveReader):
            self._reader.interrupted = True

    def __iter__(self) -> Iterator[DecodedFrame]:
        return self

    def __next__(self) -> DecodedFrame:
        frame = self.read()
        if frame is None:
            raise StopIteration
        return frame

    def __enter__(self) -> VideoSource:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ----------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class Probe:
    """What opening a source once, before a run, found.

    info: its video stream; None for a live source not reachable now (problem says why; the run
    goes on and retries it as any reconnect). frames: how many frames an offline source will give
    (its index, else duration x frame rate, then max_frames), None where unknown; exact: whether
    that count is the index's."""

    url: str
    policy: Policy
    info: VideoInfo | None
    frames: int | None = None
    exact: bool = False
    problem: str = ""


def probe_source(spec: SourceSpec, timeout_s: float = 5.0) -> Probe:
    """Open the source and decode its first frame, within about timeout_s for a network source.

    Raises SourceError for a source that cannot work: a missing file, a directory, a file that
    is not a video or whose first frame does not decode, an offline URL that cannot be read, a
    device this FFmpeg cannot open. A live source (camera, RTSP, live HLS) that cannot be reached
    now is no error: the Probe says why, as the run will keep retrying it."""
    kind = source_kind(spec.url)
    _check_openable(spec.url, kind)
    policy = spec.policy or (_hls_policy(spec) if kind == "hls" else resolve_policy(spec.url))
    if kind != "file":
        spec = dataclasses.replace(spec, stall_timeout_s=timeout_s)
    try:
        opened = _open_video(spec, kind, "AUTO")
    except SourceError:
        raise
    except FileNotFoundError as exc:
        raise SourceError(f"{spec.url}: no such file") from exc
    except (av.FFmpegError, OSError) as exc:
        if policy == "live":
            return Probe(spec.url, policy, None, problem=_reason(exc))
        what = "cannot open as a video" if kind == "file" else "cannot be read"
        raise SourceError(f"{spec.url}: {what} ({_reason(exc)})") from exc
    try:
        try:
            next(opened.container.decode(opened.stream))
        except StopIteration:
            raise SourceError(f"{spec.url}: no frame in it (an empty video)") from None
        except (av.FFmpegError, OSError) as exc:
            if policy == "live":
                return Probe(spec.url, policy, opened.info, problem=f"connected, but no frame: {_reason(exc)}")
            raise SourceError(f"{spec.url}: its first frame does not decode ({_reason(exc)})") from exc
    finally:
        opened.container.close()
    info = opened.info
    frames, exact = None, False
    if policy == "offline":
        if info.frames:
            frames, exact = info.frames, True
        elif info.duration_s and info.fps:
            frames = max(1, round(info.duration_s * info.fps))
        if spec.max_frames is not None and (frames is None or spec.max_frames <= frames):
            frames, exact = spec.max_frames, frames is not None
    return Probe(spec.url, policy, info, frames, exact)


# ----------------------------------------------------------------------------- opening


def _check_openable(url: str, kind: SourceKind) -> None:
    """Errors FFmpeg would report vaguely, caught before it tries."""
    if kind == "file":
        path = Path(urlsplit(url).path if url.startswith("file:") else url)
        if not path.exists():
            raise SourceError(f"{url}: no such file")
        if path.is_dir():
            raise SourceError(f"{url}: is a directory, expected a video file")
    if kind == "device":
        if not Path(url).exists():
            raise SourceError(f"{url}: no such device (is the camera connected?)")
        if not {"v4l2", "video4linux2"} & av.formats_available:
            raise SourceError(
                f"{url}: this PyAV's FFmpeg has no v4l2 input (PyAV's binary wheels lack it); "
                "install PyAV built against the system FFmpeg: pip install av --no-binary av"
            )


def _hls_policy(spec: SourceSpec) -> Policy:
    """A playlist that ends (VOD: FFmpeg then knows its duration) is a file; one that grows is live."""
    try:
        with _open_container(spec, "hls") as container:
            return "live" if container.duration is None else "offline"
    except (av.FFmpegError, OSError):
        return "live"  # unreachable now: the live reader retries and reports it


def _open_container(spec: SourceSpec, kind: SourceKind) -> av.container.InputContainer:
    """av.open with the options each kind needs; raises av.FFmpegError / OSError as PyAV does."""
    options: dict[str, str] = {}
    fmt = None
    if kind == "rtsp":
        # analyzeduration=0 + probesize=32 cut RTSP open from ~2.2 s to ~0.1 s here; the SDP
        # already says what the stream is.
        options.update(rtsp_transport=spec.rtsp_transport, analyzeduration="0", probesize="32")
    elif kind in ("http", "hls"):
        # FFmpeg's http protocol resumes a dropped download by itself (with a Range request).
        options.update(
            reconnect="1",
            reconnect_on_network_error="1",
            reconnect_delay_max=str(int(spec.reconnect_backoff_s[1])),
        )
    elif kind == "device":
        fmt = "v4l2"
    options.update(spec.options)
    accel = hwaccel(spec.decoder)
    if kind == "file":
        return av.open(spec.url, options=options, hwaccel=accel)
    # PyAV's interrupt callback aborts a blocked open/read after these; FFmpeg's RTSP retries
    # once, so a frozen server is noticed after about twice the read timeout = stall_timeout_s.
    timeout = (max(spec.stall_timeout_s, 1.0), spec.stall_timeout_s / 2)
    return av.open(spec.url, format=fmt, options=options, timeout=timeout, hwaccel=accel)


def _open_video(spec: SourceSpec, kind: SourceKind, threads: Literal["AUTO", "SLICE"]) -> _Opened:
    container = _open_container(spec, kind)
    try:
        stream = first_video_stream(container, spec.url, SourceError)
        if not stream.codec_context.is_hwaccel:  # NVDEC decodes whole frames itself: no CPU threads to add
            if spec.decoder == "nvdec":
                log.warning("%s: NVDEC cannot decode its %s stream: decoding it on the CPU", spec.url,
                            stream.codec.name)
            stream.thread_type = threads
        return _Opened(container, stream, stream_info(container, stream))
    except BaseException:
        container.close()
        raise


@dataclass
class _Opened:
    container: av.container.InputContainer
    stream: av.VideoStream
    info: VideoInfo

    def pts_s(self, frame: av.VideoFrame) -> float | None:
        return float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    # to_ndarray returns a strided view when FFmpeg pads rows; consumers expect C order.
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))  # [H, W, 3]


# ----------------------------------------------------------------------------- offline


class _OfflineReader:
    """Decodes in the caller's thread: lossless, ordered, ends at EOS."""

    def __init__(self, spec: SourceSpec, kind: SourceKind, convert: Callable[[av.VideoFrame], np.ndarray]) -> None:
        self.spec, self._convert = spec, convert
        try:
            # Frame threading: decodes several frames at once (see the README's figures); the
            # extra latency it adds does not matter offline.
            self._opened = _open_video(spec, kind, "AUTO")
        except SourceError:
            raise
        except FileNotFoundError as exc:
            raise SourceError(f"{spec.url}: no such file") from exc
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"{spec.url}: cannot open as a video ({_reason(exc)})") from exc
        self.info: VideoInfo | None = self._opened.info
        self._frames = self._decode()
        self._decoded = 0
        self._closed = False

    def stats(self) -> SourceStats:
        return SourceStats(decoded=self._decoded, yielded=self._decoded)

    def read(self, timeout_s: float | None = None) -> DecodedFrame | None:
        if self._closed:
            return None
        return next(self._frames, None)

    def _decode(self) -> Generator[DecodedFrame, None, None]:
        opened, url = self._opened, self.spec.url
        position = "start"
        try:
            for packet in opened.container.demux(opened.stream):
                if packet.pos is not None and packet.pos >= 0:
                    position = f"byte {packet.pos}"
                try:
                    frames = opened.stream.decode(packet)
                except av.FFmpegError as exc:
                    raise SourceError(
                        f"{url}: damaged video: the packet at {position} (pts {_packet_time(packet)}) does not "
                        f"decode, {self._decoded} frames were read before it: {_reason(exc)}"
                    ) from exc
                for frame in frames:
                    image = self._convert(frame)
                    yield DecodedFrame(self._decoded, opened.pts_s(frame), image, time.monotonic())
                    self._decoded += 1
                    if self._decoded == self.spec.max_frames:
                        return  # asked for a prefix: the rest of the file is not a truncation
        except av.FFmpegError as exc:  # demuxing failed: a broken container or a lost connection
            raise SourceError(
                f"{url}: reading stopped at {position} after {self._decoded} frames: {_reason(exc)}"
            ) from exc
        expected = opened.info.frames
        if expected is not None and self._decoded < expected:
            raise SourceError(
                f"{url}: truncated: its index lists {expected} frames, only {self._decoded} could be read "
                f"(data ends at {position})"
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._frames.close()
            self._opened.container.close()


def _packet_time(packet: av.Packet) -> str:
    if packet.pts is None or packet.time_base is None:
        return "unknown"
    return f"{float(packet.pts * packet.time_base):.3f} s"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, av.ExitError):  # PyAV's interrupt callback: our own read timeout fired
        return "no data (read timed out)"
    # FFmpegError's str repeats the URL; its strerror is the part worth reading.
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# ----------------------------------------------------------------------------- live


@dataclass
class _Slot:
    index: int
    pts_s: float | None
    frame: av.VideoFrame  # converted to RGB only when taken: replaced frames never pay for it
    decoded_at: float


class _Disconnected(Exception):
    """The current connection ended; the reader reconnects."""


class _LiveReader:
    """A daemon thread decodes into a one-slot buffer; read() takes the newest frame."""

    def __init__(self, spec: SourceSpec, kind: SourceKind, convert: Callable[[av.VideoFrame], np.ndarray]) -> None:
        self.spec, self.kind, self._convert = spec, kind, convert
        self.info: VideoInfo | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._slot: _Slot | None = None
        self._fatal: SourceError | None = None
        self._ended = False  # a file read live reached its end
        self.interrupted = False  # VideoSource.interrupt(): the waits below end, read() gives None
        self._next_index = 0
        self._last_yielded = -1
        self._counts = SourceStats()
        self._thread = threading.Thread(target=self._run, name=f"source {spec.url}", daemon=True)
        self._thread.start()

    # -- consumer side

    def stats(self) -> SourceStats:
        with self._cond:
            return self._counts

    def wait_connected(self, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Short waits in a loop keep Ctrl-C working in the main thread.
        while not self._connected.wait(0.1):
            with self._cond:
                if self._fatal:
                    raise self._fatal
                if self._stop.is_set() or self._ended or self.interrupted:
                    return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.spec.url}: not connected after {timeout_s} s")

    def read(self, timeout_s: float | None = None) -> DecodedFrame | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                slot, self._slot = self._slot, None
                if slot is not None:
                    if time.monotonic() - slot.decoded_at <= self.spec.staleness_s:
                        break
                    self._count(dropped_stale=1)
                    continue
                if self._fatal:
                    raise self._fatal
                if self._stop.is_set() or self._ended or self.interrupted:
                    return None
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"{self.spec.url}: no frame within {timeout_s} s")
                self._cond.wait(wait)
            dropped_before = slot.index - self._last_yielded - 1
            self._last_yielded = slot.index
            self._count(yielded=1)
        # The conversion runs outside the lock so the reader is never held up by it.
        return DecodedFrame(slot.index, slot.pts_s, self._convert(slot.frame), slot.decoded_at, dropped_before)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(_CLOSE_JOIN_S)

    def _count(self, last_error: str | None = None, **increments: int) -> None:
        """Called with self._cond held."""
        changes: dict[str, Any] = {k: getattr(self._counts, k) + v for k, v in increments.items()}
        if last_error is not None:
            changes["last_error"] = last_error
        self._counts = dataclasses.replace(self._counts, **changes)

    # -- reader thread

    def _run(self) -> None:
        backoff = self.spec.reconnect_backoff_s[0]
        failures = 0  # connection attempts in a row that brought no frame
        while not self._stop.is_set():
            if failures or self._connected.is_set():
                with self._cond:
                    self._count(reconnects=1)
            got_frames = False
            try:
                got_frames = self._connection()
                if self._ended or self._stop.is_set():
                    return
                reason = "stream ended (server gone?)"
            except _Disconnected as exc:
                got_frames, reason = bool(exc.args[1]), str(exc.args[0])
            except SourceError as exc:
                reason = str(exc)
            except (av.FFmpegError, OSError) as exc:
                reason = f"{type(exc).__name__}: {_reason(exc)}"
            except Exception as exc:  # never let the thread die silently: readers must hear of it
                with self._cond:
                    self._fatal = SourceError(f"{self.spec.url}: reader failed: {exc!r}")
                    self._cond.notify_all()
                return
            if got_frames:
                failures, backoff = 0, self.spec.reconnect_backoff_s[0]
            failures += 1
            with self._cond:
                self._count(last_error=reason)
                if self.spec.max_reconnects is not None and failures > self.spec.max_reconnects:
                    self._fatal = SourceError(
                        f"{self.spec.url}: gave up after {failures} connection attempts without a frame "
                        f"(max_reconnects={self.spec.max_reconnects}); last error: {reason}"
                    )
                    self._cond.notify_all()
                    return
            log.warning("%s: %s; reconnecting in %.1f s", self.spec.url, reason, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.spec.reconnect_backoff_s[1])

    def _connection(self) -> bool:
        """Read one connection until it ends; True if it gave at least one frame."""
        opened = _open_video(self.spec, self.kind, "SLICE")
        got_frames = False
        try:
            self.info = opened.info
            self._connected.set()
            pace = self.kind == "file"  # a file played live goes at its own frame rate, or at rate_fps
            rate = self.spec.rate_fps
            start_wall: float | None = None
            first_pts, played = 0.0, 0
            last_frame_at = time.monotonic()
            for packet in opened.container.demux(opened.stream):
                if self._stop.is_set():
                    return got_frames
                try:
                    frames = opened.stream.decode(packet)
                except av.FFmpegError:
                    with self._cond:
                        self._count(corrupt_packets=1)
                    frames = []
                for frame in frames:
                    pts_s = opened.pts_s(frame)
                    if pace and (pts_s is not None or rate is not None):
                        if start_wall is None:
                            start_wall, first_pts = time.monotonic(), pts_s or 0.0
                        # Due times from the start, not from the previous frame: no drift.
                        due = played / rate if rate is not None else (pts_s or 0.0) - first_pts
                        if self._stop.wait(max(0.0, start_wall + due - time.monotonic())):
                            return got_frames
                    self._publish(frame, pts_s)
                    played += 1
                    got_frames = True
                    last_frame_at = time.monotonic()
                    if self._next_index == self.spec.max_frames:
                        with self._cond:
                            self._ended = True
                            self._cond.notify_all()
                        return got_frames
                if time.monotonic() - last_frame_at > self.spec.stall_timeout_s:
                    raise _Disconnected(f"no frame for {self.spec.stall_timeout_s} s", got_frames)
            if self.kind == "file":
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()
            return got_frames
        except (av.FFmpegError, OSError) as exc:
            raise _Disconnected(f"{type(exc).__name__}: {_reason(exc)}", got_frames) from exc
        finally:
            opened.container.close()

    def _publish(self, frame: av.VideoFrame, pts_s: float | None) -> None:
        with self._cond:
            if self._slot is not None:
                self._count(dropped_replaced=1)
            self._slot = _Slot(self._next_index, pts_s, frame, time.monotonic())
            self._next_index += 1
            self._count(decoded=1)
            self._cond.notify_all()
