"""Video files with PyAV: what a file holds, writing one, and tiny numbered test clips.

    info = probe("in.mp4")                       # VideoInfo(width, height, fps, codec, frames, duration_s)
    with VideoWriter("out.mp4", fps=25, width=640, height=480) as w:
        w.write(rgb)                             # uint8 [480, 640, 3], RGB
    write_test_clip("clip.mp4", frames=30)       # moving shapes; frame number drawn in
    clip_frame_number(decoded_rgb)               # -> the number drawn into that frame

Reading frames, from files and live sources alike, is `pipeline.media.sources`. Everything here
raises `VideoError` (or `ValueError` for a wrong argument), naming the path and the problem.

The test clip draws its frame number as a row of black/white blocks, big enough to survive
lossy compression, so a test can check that decoding gave every frame, in order, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

__all__ = [
    "VideoError",
    "VideoInfo",
    "VideoWriter",
    "clip_frame_number",
    "default_codec",
    "first_video_stream",
    "probe",
    "stream_info",
    "write_test_clip",
]


class VideoError(Exception):
    """A video could not be read or written; the message names it and says what was wrong."""


@dataclass(frozen=True)
class VideoInfo:
    """The video stream of a source. fps: the nominal rate (None when the container has none).
    frames and duration_s: None when the container does not say (live sources, most mkv)."""

    width: int
    height: int
    fps: float | None
    codec: str
    frames: int | None = None
    duration_s: float | None = None


def stream_info(container: av.container.InputContainer, stream: av.VideoStream) -> VideoInfo:
    """VideoInfo of an open input stream (shared with pipeline.media.sources)."""
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration is not None and stream.time_base is not None:
        duration_s: float | None = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration_s = container.duration / av.time_base
    else:
        duration_s = None
    return VideoInfo(
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=float(rate) if rate else None,
        codec=stream.codec_context.name,
        frames=stream.frames or None,  # 0 means "not in the index"
        duration_s=duration_s,
    )


# FFmpeg's "tty" demuxer turns any .txt/.nfo/.asc file into a video of rendered ANSI text; a
# text file given as a source is a mistake to report, not 640x400 frames to segment.
_NOT_VIDEO_FORMATS = {"tty"}


def first_video_stream(
    container: av.container.InputContainer, name: str, error: type[VideoError] = VideoError
) -> av.VideoStream:
    """The container's first video stream; `error` naming `name` when there is none."""
    if container.format.name in _NOT_VIDEO_FORMATS:
        raise error(f"{name}: not a video (FFmpeg reads it as {container.format.long_name})")
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise error(f"{name}: no video stream (streams: {kinds})")
    return container.streams.video[0]


def probe(path: str | Path) -> VideoInfo:
    """What the first video stream of a file holds, read from its headers (nothing decoded)."""
    try:
        with av.open(str(path)) as container:
            return stream_info(container, first_video_stream(container, str(path)))
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: cannot read as a video ({exc})") from exc


def default_codec() -> str:
    """libx264 when this FFmpeg build has it (small, plays everywhere), else FFmpeg's own mpeg4."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class VideoWriter:
    """Encodes RGB uint8 frames [height, width, 3] into a video file; a context manager.

    crf (libx264: 0 lossless .. 51, default 23) and bitrate (bits/s) set the quality; give
    at most one. .mp4/.mov files get their index at the front (faststart), so they can be
    played while downloading. Frame n gets pts n / fps.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        width: int,
        height: int,
        codec: str | None = None,
        crf: int | None = None,
        bitrate: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.width, self.height = width, height
        self.codec = codec or default_codec()
        self.frames_written = 0
        if crf is not None and bitrate is not None:
            raise ValueError(f"{self.path}: give crf or bitrate, not both")
        if not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"{self.path}: fps must be a positive number, got {fps}")
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            # yuv420p stores chroma at half resolution: odd sizes are refused by the encoders.
            raise ValueError(f"{self.path}: width and height must be positive and even, got {width}x{height}")
        if self.codec not in av.codecs_available:
            raise VideoError(f"{self.path}: codec {self.codec!r} is not in this FFmpeg build")
        if not self.path.parent.is_dir():
            raise VideoError(f"{self.path}: directory {self.path.parent} does not exist")

        options = {}
        if self.path.suffix.lower() in (".mp4", ".mov", ".m4v"):
            options["movflags"] = "+faststart"
        try:
            self._container: av.container.OutputContainer | None = av.open(str(self.path), mode="w", options=options)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: cannot open for writing ({exc})") from exc
        try:
            # 1001 covers NTSC rates such as 29.97 exactly.
            rate = Fraction(fps).limit_denominator(1001)
            stream = self._container.add_stream(self.codec, rate=rate)
            if not isinstance(stream, av.VideoStream):
                raise VideoError(f"{self.path}: codec {self.codec!r} is not a video codec")
            self._stream = stream
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = 1 / rate
            if bitrate is not None:
                self._stream.bit_rate = bitrate
            if crf is not None:
                if self.codec != "libx264":
                    raise ValueError(f"{self.path}: crf applies to libx264, not {self.codec}; use bitrate")
                self._stream.options = {"crf": str(crf)}
            elif self.codec == "mpeg4" and bitrate is None:
                # mpeg4's default (200 kb/s) smears shapes at any size; quantiser 3 is near-transparent.
                self._stream.codec_context.qscale = True
                self._stream.codec_context.global_quality = 3 * 118  # FF_QP2LAMBDA * q
        except BaseException:
            self._container.close()
            raise

    def write(self, image: np.ndarray) -> None:
        """Append one frame: uint8 [height, width, 3], RGB."""
        expected = (self.height, self.width, 3)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != expected:
            got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(
                f"{self.path}: frame {self.frames_written}: expected uint8 {list(expected)} RGB, got {got}"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self.frames_written
        self._encode(frame)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file. Safe to call twice."""
        if self._container is None:
            return
        try:
            self._encode(None)
        finally:
            container, self._container = self._container, None
            container.close()

    def _encode(self, frame: av.VideoFrame | None) -> None:
        assert self._container is not None, "write after close"
        try:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: encoding frame {self.frames_written} failed ({exc})") from exc

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._container is not None:
            # An error is already on its way: do not bury it under a flush error.
            container, self._container = self._container, None
            container.close()


# ------------------------------------------------------------------ numbered test clips

_BITS = 12  # frame numbers up to 4095
_BLOCK = 8  # px per bit block: survives 4:2:0 chroma and lossy quantisation


def write_test_clip(
    path: str | Path,
    frames: int = 30,
    size: tuple[int, int] = (160, 120),
    fps: float = 10.0,
    codec: str | None = None,
) -> Path:
    """Write `frames` frames of size (width, height): a square and a disc moving over a
    gradient, with the frame number drawn as blocks along the top row (see clip_frame_number)."""
    width, height = size
    if width < _BITS * _BLOCK or height < 4 * _BLOCK:
        raise ValueError(f"{path}: test clips need at least {_BITS * _BLOCK}x{4 * _BLOCK} px, got {width}x{height}")
    if not 0 < frames <= 2**_BITS:
        raise ValueError(f"{path}: frames must be 1..{2**_BITS}, got {frames}")
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 96)], axis=-1
    ).astype(np.uint8)  # [H, W, 3]
    radius = height // 6
    with VideoWriter(path, fps, width, height, codec=codec) as writer:
        for n in range(frames):
            image = background.copy()
            phase = 2 * math.pi * n / max(frames, 1)
            x0 = int((width - 2 * radius) * (0.5 + 0.45 * math.sin(phase)))
            y0 = height // 2
            image[y0 : y0 + radius, x0 : x0 + radius] = (240, 40, 40)
            cx, cy = width // 2 + int(width / 4 * math.cos(phase)), height // 3 + 2 * _BLOCK
            image[(xs - cx) ** 2 + (ys - cy) ** 2 < radius**2] = (40, 40, 240)
            image[: _BLOCK * 2] = 0
            for bit in range(_BITS):
                if n >> bit & 1:
                    image[: _BLOCK * 2, bit * _BLOCK : (bit + 1) * _BLOCK] = 255
            writer.write(image)
    return Path(path)


def clip_frame_number(image: np.ndarray) -> int:
    """The frame number write_test_clip drew into `image` (decoded RGB uint8 [H, W, 3])."""
    # Sample the middle of each block, away from edges that compression blurs.
    row = image[_BLOCK // 2 : _BLOCK * 3 // 2, :, :].mean(axis=(0, 2))  # [W]
    return sum(
        1 << bit for bit in range(_BITS) if row[bit * _BLOCK + _BLOCK // 4 : (bit + 1) * _BLOCK - 2].mean() > 128
    )
