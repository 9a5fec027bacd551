"""Offline outputs: files written from the Detections/EndOfStream messages a pipeline publishes.

    with JsonlWriter("results.jsonl") as jsonl, CocoResultsWriter("coco.json") as coco, \
            AnnotatedVideoWriter("annotated.mp4", source_url="in.mp4") as video:
        for message in messages:              # one stream's messages, in seq order
            jsonl.write(message); coco.write(message); video.write(message)

Each writer takes the messages of a stream in the order the stream produced them, and keeps
what it already has when something goes wrong:
- JsonlWriter flushes every line, so after a crash the file holds every frame written so far
  (at worst the very last line is cut short). `JsonlWriter(path, resume=True)` is how a
  restarted publish stage goes on with it: complete lines are kept (`recovered`), a torn last
  line is cut, and new lines are appended (the file is the pipeline's journal, docs/delivery.md);
  `pipeline.client.from_json` turns a line back into its message;
- CocoResultsWriter holds its results in memory and writes the whole file atomically when
  closed (also when the `with` block is left by an exception), so the file is either the
  previous one or complete; its results are in image id order, whatever order streams interleaved in;
- AnnotatedVideoWriter finishes the video file when closed, with every frame written so far.

Missing parent directories are created. Errors name the file: `OutputError` (an OSError)
for files that cannot be opened or written (`pipeline.media.video.VideoError` from the video
encoder), ValueError for messages that do not fit (wrong stream, out of order, wrong size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import av
import numpy as np
from maskstream.pipeline.client import from_json
from maskstream.pipeline.media.annotate import draw_detections
from maskstream.pipeline.media.video import VideoWriter
from maskstream.pipeline.results import Published, SeqTracker, masks, rles, to_json
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Header

__all__ = ["AnnotatedVideoWriter", "CocoResultsWriter", "JsonlWriter", "OutputError"]


class OutputError(OSError):
    """An output file could not be opened or written; the message names it."""


class _Writer:
    """Context-manager plumbing shared by the writers: __exit__ always closes, so results
    already received are kept even when the block is left by an exception."""

    path: Path

    def write(self, message: Published) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_error:  # the error already on its way matters more
            exc.add_note(f"{self.path}: also failed to close after it: {close_error}")

    def _check(self, message: object) -> None:
        if not isinstance(message, (Detections, EndOfStream)):
            raise ValueError(f"{self.path}: expected Detections or EndOfStream, got {type(message).__name__}")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create its directory ({exc.strerror or exc})") from None


def _open_for_writing(path: Path, append: bool = False) -> IO[str]:
    _make_parent(path)
    try:
        return open(path, "a" if append else "w", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{path}: cannot open for writing ({exc.strerror or exc})") from None


class JsonlWriter(_Writer):
    """One JSON line per message (`pipeline.results.to_json`, with "gap"; format in docs/schema.md).

    Detections lines carry the frame; an EndOfStream line ends a stream (its "error" says
    why when the source failed). Several streams may share one file: lines carry stream_id.

    resume=True goes on with the file a killed writer left: its complete lines are kept (parsed,
    in `recovered`), the bytes after the last newline (a line cut short by the kill) are cut,
    and lines are appended after them; "gap" goes on counting from the lines kept. Without the
    file it starts one."""

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self._tracker = SeqTracker()
        self.recovered: list[dict[str, Any]] = _recover_lines(self.path) if resume and self.path.exists() else []
        for record in self.recovered:
            self._tracker.observe(from_json(record))
        self._file: IO[str] | None = _open_for_writing(self.path, append=resume)
        self.lines_written = len(self.recovered)

    def write(self, message: Published) -> dict[str, Any]:
        """Append the message's line; the line as a dict (what `pipeline.client.from_json` reads)."""
        self._check(message)
        if self._file is None:
            raise ValueError(f"{self.path}: write after close")
        record = to_json(message, gap=self._tracker.observe(message))
        line = json.dumps(record, separators=(",", ":"))
        try:
            self._file.write(line + "\n")
            self._file.flush()  # a crash then loses at most the line being written
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write line {self.lines_written + 1} ({exc})") from None
        self.lines_written += 1
        return record

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


def _recover_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file a killed writer left, parsed; a torn last line is cut off."""
    try:
        with open(path, "r+b") as file:
            data = file.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                file.truncate(keep)
    except OSError as exc:
        raise OutputError(f"{path}: cannot recover ({exc.strerror or exc})") from None
    records = []
    for number, line in enumerate(data[:keep].splitlines(), 1):
        try:
            record = json.loads(line)
            from_json(record)  # fails here, naming the line, rather than later
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise OutputError(f"{path}: line {number} is not a maskstream JSON line ({exc})") from None
        records.append(record)
    return records


def _seq_of(header: Header) -> int:
    return header.seq


class CocoResultsWriter(_Writer):
    """COCO detection results JSON (the list `COCO.loadRes` reads), one entry per instance:
    image_id, category_id, segmentation (full-frame RLE, counts as str), bbox [x, y, w, h]
    in pixels, score. Written atomically (temp file + rename) at close, in image id order.

    image_id_of: the COCO image id of a frame (default: its seq, allowed for one stream only,
        since two streams would give two frames the same id).
    category_id_of: the COCO category id of a label (default: the label itself, which is
        right for torchvision's 91-slot COCO labels and for `model.synthetic.to_coco`)."""

    def __init__(
        self,
        path: str | Path,
        image_id_of: Callable[[Header], int] | None = None,
        category_id_of: Callable[[int], int] | None = None,
    ) -> None:
        self.path = Path(path)
        self._image_id_of = image_id_of or _seq_of
        self._check_one_stream = image_id_of is None
        self._category_id_of = category_id_of or int
        self._results: list[dict[str, Any]] | None = []
        self._stream_id: str | None = None
        # Refuse an unwritable destination now, not after hours of inference.
        _make_parent(self.path)
        if not os.access(self.path.parent, os.W_OK):
            raise OutputError(f"{self.path}: directory {self.path.parent} is not writable")

    @property
    def results(self) -> list[dict[str, Any]]:
        """The results gathered so far (what close will write)."""
        return list(self._results or [])

    def write(self, message: Published) -> None:
        self._check(message)
        if self._results is None:
            raise ValueError(f"{self.path}: write after close")
        if self._check_one_stream:
            if self._stream_id is None:
                self._stream_id = message.header.stream_id
            elif message.header.stream_id != self._stream_id:
                raise ValueError(
                    f"{self.path}: frames of streams {self._stream_id!r} and {message.header.stream_id!r} would share "
                    "image ids (seq); pass image_id_of to number them apart"
                )
        if isinstance(message, EndOfStream):
            return
        image_id = int(self._image_id_of(message.header))
        for box, score, label, rle in zip(message.boxes, message.scores, message.labels, rles(message)):
            x0, y0, x1, y1 = (float(v) for v in box)
            self._results.append(
                {
                    "image_id": image_id,
                    "category_id": int(self._category_id_of(int(label))),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                    "score": float(score),
                }
            )

    def close(self) -> None:
        if self._results is None:
            return
        results, self._results = self._results, None
        results.sort(key=lambda result: result["image_id"])  # stable: an image's instances keep their order
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(results, file)
            os.replace(temporary, self.path)  # readers see the old file or the whole new one
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: cannot write the COCO results ({exc.strerror or exc})") from None


class AnnotatedVideoWriter(_Writer):
    """The source video again, with each frame's masks, boxes and labels drawn in.

    Pixels never travel to the sink: the writer decodes `source_url` (a video file) itself
    and pairs decoded frame n with the Detections whose seq is n, so it relies on the
    pipeline numbering a file's frames in decode order from 0 (as the decode stage does).

    Frames without a Detections message (dropped by a live stage) are written undrawn, so
    the video keeps the source's length and timing. After an EndOfStream the rest of the
    source is copied undrawn, up to max_frames frames in all (the run's source.max_frames: the
    frames the run never processed are left out, not shown as frames without detections);
    closing without one ends the video at the last frame written.

    fps: the output rate (default: the source's). codec/crf: see pipeline.media.video.VideoWriter."""

    def __init__(
        self,
        path: str | Path,
        source_url: str | Path,
        fps: float | None = None,
        codec: str | None = None,
        crf: int | None = None,
        max_frames: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.source = str(source_url)
        self.max_frames = max_frames
        _make_parent(self.path)
        if not Path(self.source).is_file():
            raise ValueError(
                f"{self.path}: source {self.source!r} is not a video file; annotated videos re-decode the source, "
                "which a live stream cannot give again"
            )
        try:
            self._container = av.open(self.source)
        except (av.FFmpegError, OSError) as exc:
            raise ValueError(f"{self.path}: cannot open source {self.source} as a video ({exc})") from None
        try:
            if not self._container.streams.video:
                raise ValueError(f"{self.path}: source {self.source} has no video stream")
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = fps or stream.average_rate or stream.guessed_rate
            if not rate:
                raise ValueError(f"{self.path}: source {self.source} does not say its frame rate; pass fps")
            width, height = stream.codec_context.width, stream.codec_context.height
            self._frames: Iterator[av.VideoFrame] = self._container.decode(stream)
            self._video: VideoWriter | None = VideoWriter(self.path, float(rate), width, height, codec=codec, crf=crf)
        except BaseException:
            self._container.close()
            raise
        self.frame_hw = (height, width)
        self.frames_written = 0
        self._stream_id: str | None = None
        self._ended = False

    def write(self, message: Published) -> None:
        self._check(message)
        if self._video is None:
            raise ValueError(f"{self.path}: write after close")
        sid = message.header.stream_id
        if self._stream_id is None:
            self._stream_id = sid
        elif sid != self._stream_id:
            raise ValueError(f"{self.path}: annotates stream {self._stream_id!r}, got a message of stream {sid!r}")
        if self._ended:
            raise ValueError(f"{self.path}: stream {sid!r} got seq {message.header.seq} after its EndOfStream")
        if isinstance(message, EndOfStream):
            while not self._full() and (image := self._next_source_frame()) is not None:
                self._video.write(image)
                self.frames_written += 1
            self._ended = True
            return
        seq = message.header.seq
        if seq < self.frames_written:
            raise ValueError(
                f"{self.path}: stream {sid!r} seq {seq} arrived after frame {self.frames_written - 1} was written "
                "(messages must come in seq order)"
            )
        if tuple(message.frame_hw) != self.frame_hw:
            raise ValueError(
                f"{self.path}: stream {sid!r} seq {seq} has frame size {tuple(message.frame_hw)}, "
                f"the source {self.source} is {self.frame_hw}"
            )
        while self.frames_written <= seq:
            image = self._next_source_frame()
            if image is None:
                raise ValueError(
                    f"{self.path}: source {self.source} ended after {self.frames_written} frames, "
                    f"but stream {sid!r} has seq {seq}"
                )
            if self.frames_written == seq:
                image = _draw(image, message)
            self._video.write(image)
            self.frames_written += 1

    def close(self) -> None:
        if self._video is None:
            return
        video, self._video = self._video, None
        try:
            video.close()
        finally:
            self._container.close()

    def _full(self) -> bool:
        return self.max_frames is not None and self.frames_written >= self.max_frames

    def _next_source_frame(self) -> np.ndarray | None:
        try:
            frame = next(self._frames, None)
        except (av.FFmpegError, OSError) as exc:
            where = f"{self.path}: decoding source {self.source} frame {self.frames_written}"
            raise ValueError(f"{where} failed ({exc})") from None
        return None if frame is None else frame.to_ndarray(format="rgb24")


def _draw(image: np.ndarray, det: Detections) -> np.ndarray:
    # draw_detections looks names up by label; the message carries one name per instance.
    labels = [int(v) for v in det.labels]
    names = [f"class_{i}" for i in range(max(labels, default=-1) + 1)]
    for label, name in zip(labels, det.class_names):
        if label >= 0:
            names[label] = name
    return draw_detections(image, det.boxes, det.labels, det.scores, masks(det), names)
