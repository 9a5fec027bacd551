"""pipeline.media.video: writing, probing and the numbered test clips, on real encoders and files."""

from __future__ import annotations

import av
import numpy as np
import pytest
from maskstream.pipeline.media.video import (
    VideoError,
    VideoWriter,
    clip_frame_number,
    default_codec,
    probe,
    write_test_clip,
)

from tests.shared_data import DATA, require

CODECS = ["mpeg4", *(["libx264"] if "libx264" in av.codecs_available else [])]


def decode_all(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_test_clip_numbers_survive_encoding(tmp_path, codec, suffix):
    path = write_test_clip(tmp_path / f"clip{suffix}", frames=24, size=(160, 96), fps=12, codec=codec)
    images = decode_all(path)
    assert [clip_frame_number(image) for image in images] == list(range(24))
    assert images[0].shape == (96, 160, 3)
    # The shapes move: consecutive frames differ.
    assert np.abs(images[1].astype(int) - images[0]).mean() > 0.5


def test_probe_generated_clip(tmp_path):
    info = probe(write_test_clip(tmp_path / "clip.mp4", frames=15, size=(128, 64), fps=5))
    assert (info.width, info.height, info.fps, info.frames) == (128, 64, 5.0, 15)
    assert info.duration_s == pytest.approx(3.0)
    assert info.codec == ("h264" if default_codec() == "libx264" else "mpeg4")


@pytest.mark.parametrize(
    "name, size, fps, frames",
    [
        ("vtest.mp4", (480, 360), 10.0, 795),
        ("car-detection.mp4", (768, 432), 12.5, 377),
        ("asl_walk.mkv", (640, 480), 30.0, None),
    ],
)
def test_probe_real_videos(name, size, fps, frames):
    info = probe(require(DATA / "videos" / name))
    assert ((info.width, info.height), info.fps, info.codec, info.frames) == (size, fps, "h264", frames)


def test_probe_errors_name_the_file(tmp_path):
    # FFmpeg would open a .txt as a "video" of rendered ANSI text: refused.
    (tmp_path / "notes.txt").write_text("not a video\n" * 100)
    with pytest.raises(VideoError, match="notes.txt: not a video"):
        probe(tmp_path / "notes.txt")
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    with pytest.raises(VideoError, match="noise.bin: cannot read as a video"):
        probe(tmp_path / "noise.bin")
    with pytest.raises(VideoError, match="missing.mp4"):
        probe(tmp_path / "missing.mp4")


def test_writer_round_trip_is_close(tmp_path):
    ys, xs = np.mgrid[0:64, 0:96]
    image = np.stack([xs * 2, ys * 3, np.full_like(xs, 128)], axis=-1).astype(np.uint8)  # [64, 96, 3]
    with VideoWriter(
        tmp_path / "w.mp4", fps=25, width=96, height=64, crf=10 if default_codec() == "libx264" else None
    ) as w:
        for _ in range(3):
            w.write(image)
    assert w.frames_written == 3
    decoded = decode_all(tmp_path / "w.mp4")
    assert len(decoded) == 3
    # 4:2:0 chroma and lossy coding: small error on a smooth image, no channel swap.
    assert np.abs(decoded[0].astype(int) - image).mean() < 4


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", fps=10, width=31, height=32)
    with pytest.raises(ValueError, match="crf or bitrate"):
        VideoWriter(tmp_path / "both.mp4", fps=10, width=32, height=32, crf=20, bitrate=10**6)
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "fps.mp4", fps=0, width=32, height=32)
    with pytest.raises(VideoError, match="no-such-codec"):
        VideoWriter(tmp_path / "codec.mp4", fps=10, width=32, height=32, codec="no-such-codec")
    with pytest.raises(VideoError, match="does not exist"):
        VideoWriter(tmp_path / "no" / "dir.mp4", fps=10, width=32, height=32)
    with VideoWriter(tmp_path / "shape.mp4", fps=10, width=32, height=32) as writer:
        with pytest.raises(ValueError, match=r"frame 0: expected uint8 \[32, 32, 3\] RGB, got float32 \[32, 32, 3\]"):
            writer.write(np.zeros((32, 32, 3), np.float32))
        with pytest.raises(ValueError, match=r"got uint8 \[32, 32\]"):
            writer.write(np.zeros((32, 32), np.uint8))
        writer.write(np.zeros((32, 32, 3), np.uint8))
    writer.close()  # twice is fine
    assert probe(tmp_path / "shape.mp4").frames == 1


def test_writer_keeps_the_first_error(tmp_path):
    with pytest.raises(KeyError, match="boom"):
        with VideoWriter(tmp_path / "err.mp4", fps=10, width=32, height=32):
            raise KeyError("boom")
