"""maskstream.pipeline.media.sources on real files and a real RTSP server (GStreamer, tests/rtsp_server.py)."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
import time

import av
import numpy as np
import pytest
from maskstream.pipeline.media.sources import SourceError, SourceSpec, VideoSource, resolve_policy
from maskstream.pipeline.media.video import clip_frame_number, write_test_clip

from tests.shared_data import DATA, require

VIDEOS = DATA / "videos"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """60 numbered frames, 160x120 at 30 fps (2 s)."""
    return write_test_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", frames=60, size=(160, 120), fps=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resolve_policy():
    assert resolve_policy("video.mp4") == "offline"
    assert resolve_policy("/data/a b.mkv") == "offline"
    assert resolve_policy("file:///data/a.mp4") == "offline"
    assert resolve_policy("https://host/video.mp4") == "offline"
    assert resolve_policy("https://host/live/index.m3u8") == "live"
    assert resolve_policy("rtsp://cam:554/stream") == "live"
    assert resolve_policy("rtmp://host/app/key") == "live"
    assert resolve_policy("/dev/video0") == "live"


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="stall_timeout_s must be > 0"):
        SourceSpec("rtsp://x", stall_timeout_s=0)
    with pytest.raises(ValueError, match="reconnect_backoff_s"):
        SourceSpec("rtsp://x", reconnect_backoff_s=(2.0, 1.0))
    with pytest.raises(ValueError, match="rtsp_transport"):
        SourceSpec("rtsp://x", rtsp_transport="http")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- offline


def test_offline_clip_every_frame_in_order(clip):
    with VideoSource(str(clip)) as source:
        assert source.policy == "offline"
        assert (source.info.width, source.info.height, source.info.frames) == (160, 120, 60)
        frames = list(source)
    assert [clip_frame_number(f.image) for f in frames] == list(range(60))
    assert [f.index for f in frames] == list(range(60))
    assert [f.pts_s for f in frames] == pytest.approx([n / 30 for n in range(60)])
    image = frames[0].image
    assert image.dtype == np.uint8 and image.shape == (120, 160, 3) and image.flags.c_contiguous
    assert all(f.dropped_before == 0 for f in frames)
    assert source.stats.decoded == source.stats.yielded == 60


@pytest.mark.parametrize("name, count", [("vtest.mp4", 795), ("car-detection.mp4", 377), ("asl_walk.mkv", 89)])
def test_offline_real_videos_exact_count_and_order(name, count):
    path = require(VIDEOS / name)
    with av.open(str(path)) as container:  # the reference: PyAV's own decode, presentation order
        reference_pts = [frame.time for frame in container.decode(video=0)]
    with VideoSource(str(path)) as source:
        seen = [(f.index, f.pts_s) for f in source]
    assert len(seen) == count
    assert [i for i, _ in seen] == list(range(count))
    assert [p for _, p in seen] == pytest.approx(reference_pts)
    assert all(a < b for a, b in zip(reference_pts, reference_pts[1:]))


def test_truncated_file_yields_what_decodes_then_raises(clip, tmp_path):
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    numbers = []
    with pytest.raises(SourceError, match=r"cut\.mp4: truncated: its index lists 60 frames, only \d+ could be read"):
        with VideoSource(str(cut)) as source:
            for frame in source:
                numbers.append(clip_frame_number(frame.image))
    assert 0 < len(numbers) < 60
    assert numbers == list(range(len(numbers)))


def test_damaged_packets_raise_with_position(clip, tmp_path):
    data = bytearray(clip.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 1500] = np.random.default_rng(1).integers(0, 256, 1500, np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    count = 0
    with pytest.raises(SourceError, match=r"bad\.mp4: damaged video: the packet at byte \d+ .* does not decode"):
        with VideoSource(str(bad)) as source:
            for _ in source:
                count += 1
    assert count > 0


def test_open_errors_name_the_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n" * 100)
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 40)
    cases = [
        (tmp_path / "missing.mp4", "missing.mp4: no such file"),
        (tmp_path, "is a directory"),
        (tmp_path / "notes.txt", "notes.txt: not a video"),
        (tmp_path / "noise.mp4", "noise.mp4: cannot open as a video"),
    ]
    for path, message in cases:
        with pytest.raises(SourceError, match=message):
            VideoSource(str(path)).open()


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(SourceError, match=r"tone\.wav: no video stream \(streams: audio\)"):
        VideoSource(str(path)).open()


def test_missing_device_is_a_clear_error():
    with pytest.raises(SourceError, match="/dev/video-maskstream-test: no such device"):
        VideoSource("/dev/video-maskstream-test").open()


# ----------------------------------------------------------------------------- http(s) and HLS


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_dir(tmp_path_factory, clip):
    """An HTTP server on a free port serving the clip, a VOD HLS copy of it and a live-style playlist."""
    root = tmp_path_factory.mktemp("http")
    shutil.copy(clip, root / "clip.mp4")
    with (
        av.open(str(clip)) as inp,
        av.open(str(root / "vod.m3u8"), "w", format="hls", options={"hls_time": "1"}) as out,
    ):
        src = inp.streams.video[0]
        dst = out.add_stream_from_template(src)
        for packet in inp.demux(src):
            if packet.dts is not None:  # skip the flush packet
                packet.stream = dst
                out.mux(packet)
    # The same segments without the end tag: a playlist that may still grow, as a live one.
    playlist = (root / "vod.m3u8").read_text().replace("#EXT-X-ENDLIST\n", "").replace("#EXT-X-PLAYLIST-TYPE:VOD\n", "")
    (root / "live.m3u8").write_text(playlist)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["clip.mp4", "vod.m3u8"])
def test_http_and_vod_hls_are_offline_and_complete(http_dir, name):
    with VideoSource(f"{http_dir}/{name}") as source:
        assert source.policy == "offline"
        numbers = [clip_frame_number(f.image) for f in source]
    assert numbers == list(range(60))


def test_live_hls_playlist_is_live(http_dir):
    with VideoSource(SourceSpec(f"{http_dir}/live.m3u8", stall_timeout_s=2.0)) as source:
        assert source.policy == "live"
        frame = source.read(timeout_s=5)
    assert frame is not None and frame.image.shape == (120, 160, 3)


# ----------------------------------------------------------------------------- live, from a file


def test_live_slow_consumer_drops_are_counted_and_latency_bounded(clip):
    """A file read live is paced at 30 fps; a consumer taking 0.1 s per frame sees only the newest."""
    spec = SourceSpec(str(clip), policy="live", staleness_s=0.5)
    taken, latencies = [], []
    with VideoSource(spec) as source:
        for frame in source:
            latencies.append(time.monotonic() - frame.decoded_at)
            taken.append(frame)
            time.sleep(0.1)
        stats = source.stats
    indices = [f.index for f in taken]
    assert all(b > a for a, b in zip(indices, indices[1:]))
    assert any(b - a > 1 for a, b in zip(indices, indices[1:])), indices  # gaps = drops
    assert [f.dropped_before for f in taken] == [b - a - 1 for a, b in zip([-1, *indices], indices)]
    assert stats.decoded == 60 and stats.yielded == len(taken) < 40
    assert stats.dropped == sum(f.dropped_before for f in taken) == 60 - len(taken)
    # Each frame handed out is the newest: at most one frame interval old, plus scheduling noise.
    assert max(latencies) < 0.25, latencies
    # The index still tells which picture it is (the clip numbers its frames).
    assert all(clip_frame_number(f.image) == f.index for f in taken)


def test_live_close_is_prompt(clip):
    source = VideoSource(SourceSpec(str(clip), policy="live")).open()
    assert source.read(timeout_s=5) is not None
    start = time.monotonic()
    source.close()
    assert time.monotonic() - start < 1.0
    assert source.read() is None


# ----------------------------------------------------------------------------- live, real RTSP


def test_unreachable_rtsp_gives_up_in_bounded_time():
    url = f"rtsp://127.0.0.1:{free_port()}/stream"
    spec = SourceSpec(url, max_reconnects=2, reconnect_backoff_s=(0.05, 0.2))
    start = time.monotonic()
    with pytest.raises(SourceError, match=rf"{url}: gave up after 3 connection attempts .*Connection refused"):
        VideoSource(spec).open()
    assert time.monotonic() - start < 3


def test_rtsp_tcp_frames_equal_the_file(rtsp_server):
    """Over TCP nothing is lost: read offline, the first frames equal the file's own decode."""
    path = require(VIDEOS / "car-detection.mp4")
    server = rtsp_server(path)
    with av.open(str(path)) as container:
        expected = [f.to_ndarray(format="rgb24") for f, _ in zip(container.decode(video=0), range(25))]
    start = time.monotonic()
    with VideoSource(SourceSpec(server.url, policy="offline", rtsp_transport="tcp")) as source:
        assert time.monotonic() - start < 2  # analyzeduration=0, probesize=32: no 2 s probe
        assert (source.info.width, source.info.height, source.info.codec) == (768, 432, "h264")
        got = [f for f, _ in zip(source, range(25))]
    assert [f.index for f in got] == list(range(25))
    assert all(np.array_equal(f.image, e) for f, e in zip(got, expected))


def test_rtsp_live_reconnects_after_server_restart(rtsp_server):
    server = rtsp_server(require(VIDEOS / "asl_walk.mkv"), loop=True)
    spec = SourceSpec(server.url, reconnect_backoff_s=(0.1, 0.4), stall_timeout_s=2.0)
    with VideoSource(spec) as source:
        before = [source.read(timeout_s=5) for _ in range(10)]
        server.kill()
        time.sleep(0.5)  # the client sees the end of the stream and starts reconnecting
        server.start()  # same port
        after = [source.read(timeout_s=10) for _ in range(10)]
        stats = source.stats
    indices = [f.index for f in before + after]
    assert all(b > a for a, b in zip(indices, indices[1:])), indices  # index continues across reconnects
    assert stats.reconnects >= 1
    assert stats.last_error is not None
    assert after[-1].image.shape == (480, 640, 3)


def test_rtsp_frozen_server_is_a_stall(rtsp_server):
    """SIGSTOP keeps the TCP connection open but silent: a stall, noticed after ~stall_timeout_s."""
    server = rtsp_server(require(VIDEOS / "asl_walk.mkv"), loop=True)
    spec = SourceSpec(server.url, stall_timeout_s=1.0, reconnect_backoff_s=(0.1, 0.2))
    with VideoSource(spec) as source:
        assert source.read(timeout_s=5) is not None
        server.freeze()
        stalled_at = time.monotonic()
        with pytest.raises(TimeoutError):
            while True:
                source.read(timeout_s=0.5)
        deadline = time.monotonic() + 5
        while source.stats.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.stats.reconnects >= 1, source.stats
        assert time.monotonic() - stalled_at < 4
        assert "read timed out" in source.stats.last_error or "no frame" in source.stats.last_error


def test_rtsp_udp_transport(rtsp_server):
    server = rtsp_server(require(VIDEOS / "asl_walk.mkv"), loop=True)
    with VideoSource(SourceSpec(server.url, rtsp_transport="udp")) as source:
        frames = [source.read(timeout_s=5) for _ in range(10)]
    assert all(f is not None and f.image.shape == (480, 640, 3) for f in frames)


def test_live_read_from_another_thread_while_closing(rtsp_server):
    """close() from another thread (a signal handler, a supervisor) ends a blocked read."""
    server = rtsp_server(require(VIDEOS / "asl_walk.mkv"), loop=True)
    source = VideoSource(SourceSpec(server.url)).open()
    results = []
    reader = threading.Thread(target=lambda: results.extend(iter(source)))
    reader.start()
    time.sleep(0.5)
    start = time.monotonic()
    source.close()
    reader.join(2)
    assert not reader.is_alive() and time.monotonic() - start < 1.0
    assert results
