"""A real RTSP server for the tests: GStreamer's GstRtspServer serving one video file as is.

Run it with the system Python, which has PyGObject (`make rtsp-server-deps` installs the
Debian packages):

    /usr/bin/python3 tests/rtsp_server.py VIDEO [--port 0]

It prints `READY rtsp://127.0.0.1:PORT/stream` on stdout once the port is listening
(`--port 0` picks a free port), then serves until killed. The H.264 track of an .mp4/.mov
or .mkv/.webm file is payloaded without re-encoding, paced in real time. Every client gets
its own session from the start of the file (the media is not shared), over UDP or TCP
interleaved, whichever it asks for.

Each client's session ends when the file does. For a camera that streams as long as a test
runs, the `rtsp_server` fixture serves a copy of the file repeated back to back
(tests/rtsp_fixtures.py, `loop=True`).

This file is not imported by pytest (it needs `gi`, which the project's venv lacks);
tests/rtsp_fixtures.py starts it as a subprocess.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

DEMUXERS = {".mp4": "qtdemux", ".mov": "qtdemux", ".m4v": "qtdemux", ".mkv": "matroskademux", ".webm": "matroskademux"}


def launch_line(video: Path) -> str:
    demuxer = DEMUXERS.get(video.suffix.lower())
    if demuxer is None:
        raise SystemExit(f"{video}: expected one of {sorted(DEMUXERS)}")
    # Quoting the location keeps paths with spaces intact for gst_parse_launch.
    location = str(video).replace("\\", "\\\\").replace('"', '\\"')
    # config-interval=-1 repeats SPS/PPS before every keyframe, so a client that joins or
    # rejoins mid-stream can start decoding at the next keyframe.
    return (
        f'( filesrc location="{location}" ! {demuxer} name=demux demux.video_0 ! queue ! h264parse '
        "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("--port", type=int, default=8554, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    video = args.video.resolve()
    if not video.is_file():
        raise SystemExit(f"{video}: no such file")

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    # A thread (and main context) per client, as a camera serves its clients independently. With
    # GstRtspServer's default pool of one thread, every client shares it, and a client that leaves
    # mid-stream (closed or killed) can stall it: tearing its media down waits on a streaming
    # thread that waits for that same context to drain the closed connection's backlog, so new
    # clients connect but get no reply until the wait times out, a minute or more later.
    server.get_thread_pool().set_max_threads(-1)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch_line(video))
    factory.set_shared(False)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}")
    # attach() has bound the socket, so the port is real (also when 0 was asked for).
    print(f"READY rtsp://{args.host}:{server.get_bound_port()}/stream", flush=True)
    try:
        GLib.MainLoop().run()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
