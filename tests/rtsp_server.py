"""A real RTSP server for the tests: GStreamer's GstRtspServer serving one video file as is.

Run it with the system Python, which has PyGObject (`make rtsp-server-deps` installs the
Debian packages):

    /usr/bin/python3 tests/rtsp_server.py VIDEO [--port 0] [--loop]

It prints `READY rtsp://127.0.0.1:PORT/stream` on stdout once the port is listening
(`--port 0` picks a free port), then serves until killed. The H.264 track of an .mp4/.mov
or .mkv/.webm file is payloaded without re-encoding, paced in real time. Every client gets
its own session from the start of the file (the media is not shared), over UDP or TCP
interleaved, whichever it asks for.

`--loop` plays the file again and again without a gap: the pipeline runs a segment seek
and, at each SEGMENT_DONE, seeks back to the start without flushing, so running time (and
with it the RTP timestamps) keeps increasing as in a live camera.

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


class LoopingFactory(GstRtspServer.RTSPMediaFactory):
    """Adds gapless looping to each media pipeline it makes (see the module docstring)."""

    def __init__(self, loop: bool) -> None:
        super().__init__()
        self._loop = loop
        self.connect("media-configure", self._on_media_configure)

    def _on_media_configure(self, _factory: object, media: GstRtspServer.RTSPMedia) -> None:
        if not self._loop:
            return
        pipeline = media.get_element().get_parent() or media.get_element()
        bus = pipeline.get_bus()
        # RTSPMedia owns the bus watch; sync messages are delivered besides it, in the
        # streaming thread, where a non-flushing seek is allowed.
        bus.enable_sync_message_emission()
        started = {"done": False}

        def on_sync(_bus: Gst.Bus, message: Gst.Message) -> None:
            if message.type == Gst.MessageType.SEGMENT_DONE:
                pipeline.seek_simple(Gst.Format.TIME, Gst.SeekFlags.SEGMENT, 0)

        def on_state(_media: object, state: int) -> None:
            # The first PLAY turns the normal segment into a looping one (once per media).
            if state == Gst.State.PLAYING and not started["done"]:
                started["done"] = True
                GLib.idle_add(
                    lambda: (
                        pipeline.seek_simple(
                            Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.SEGMENT | Gst.SeekFlags.ACCURATE, 0
                        )
                        and False
                    )
                )

        bus.connect("sync-message", on_sync)
        media.connect("new-state", on_state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("--port", type=int, default=8554, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--loop", action="store_true", help="play the file forever")
    args = parser.parse_args()
    video = args.video.resolve()
    if not video.is_file():
        raise SystemExit(f"{video}: no such file")

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    factory = LoopingFactory(args.loop)
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
