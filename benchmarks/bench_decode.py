"""Decode speed: FFmpeg's own decoding vs our decode stage, on the same video, measured side
by side in one run (interleaved rounds, median frames/s per side):

- ffmpeg_cli:    `ffmpeg -benchmark -threads 0 -i VIDEO -f null -` (FFmpeg's own tool, decode
                 only, timed by its own -benchmark rtime; only where an `ffmpeg` binary is
                 installed, else left out and said so);
- pyav_decode:   PyAV decoding every frame with FFmpeg's frame threading, no conversion, the
                 pixels left in FFmpeg's buffers (the floor for anything built on PyAV);
- decode_stage:  our decode stage's work in one process (pipeline.stages.decode.DecodeStage:
                 the same decoding + each frame's 4:2:0 planes written into a claimed
                 shared-memory ring slot + its Frame message), nothing sent;
- decode_process: the decode stage as the pipeline runs it: its own process, sending every
                 frame through the ring and ZeroMQ to a consumer here that maps and releases it.

    python benchmarks/bench_decode.py [--video PATH] [--rounds 5] [--out PATH] [--smoke]

Ratios are our sides' frames/s over pyav_decode (and over ffmpeg_cli where there is one).
Writes decode_<video name>.json (see --out) with the machine description. --smoke: one round,
on the generated sample clip unless --video.
Full-range video (yuvj420p, as phones and MJPEG cameras give) travels as planes too, like
yuv420p (it took swscale's RGB route before, at about 1/4 of the decode speed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from golden_state import SHARED  # benchmarks/, beside this script
from maskstream.pipeline.media.sources import SourceSpec
from maskstream.pipeline.run_config import write_sample_clip
from maskstream.pipeline.runtime.messages import EndOfStream, Frame
from maskstream.pipeline.runtime.shm_ring import Ring, RingReaders
from maskstream.pipeline.runtime.stage import OutputBuffers, Wiring
from maskstream.pipeline.runtime.transport import Inbox, unpack
from maskstream.pipeline.stages import decode
from options import add_output_options, parse_args, results_file

DEFAULT_VIDEO = SHARED / "data" / "videos" / "asl_walk.mkv"
SLOT_BYTES = 1920 * 1080 * 3  # configs/pipeline.yaml transport.frame_slot_bytes


def ffmpeg_cli(video: str) -> tuple[int, float]:
    """Frames and seconds of FFmpeg's own decode loop (its -benchmark rtime: process start-up
    and probing left out, as the other sides leave out theirs)."""
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg is not None
    done = subprocess.run([ffmpeg, "-hide_banner", "-nostdin", "-benchmark", "-threads", "0", "-i", video,
                           "-map", "0:v:0", "-f", "null", "-"], capture_output=True, text=True, check=True)
    log = done.stderr.replace("\r", "\n")
    frames = [int(line.split("frame=")[1].split()[0]) for line in log.splitlines() if "frame=" in line]
    rtime = [float(line.split("rtime=")[1].rstrip("s")) for line in log.splitlines() if "rtime=" in line]
    if not frames or not rtime:
        raise RuntimeError(f"ffmpeg printed no frame count or benchmark time: {log[-500:]}")
    return frames[-1], rtime[-1]


def pyav_decode(video: str) -> tuple[int, float]:
    start = time.perf_counter()
    frames = 0
    with av.open(video) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as the offline source decodes
        for _ in container.decode(stream):
            frames += 1
    return frames, time.perf_counter() - start


def decode_stage(video: str, ring: Ring) -> tuple[int, float]:
    stage = decode.DecodeStage(decode.DecodeConfig("bench", SourceSpec(video, policy="offline")), OutputBuffers(ring))
    start = time.perf_counter()
    frames = 0
    for message in stage.messages():
        if isinstance(message, Frame):
            int(message.image[0, :64].sum())  # the pixels are there
            frames += 1
    ring.release_claims()
    return frames, time.perf_counter() - start


def decode_process(video: str, ring: Ring, directory: str) -> tuple[int, float]:
    """The real decode stage process -> ring + ZeroMQ -> a consumer here, to the EndOfStream."""
    inbox = Inbox(f"ipc://{directory}/frames", hwm=2)
    wiring = Wiring(stage="decode.bench", reports=f"ipc://{directory}/reports", outboxes=(f"ipc://{directory}/frames",),
                    ring=ring.name, hwm=2)
    config = decode.DecodeConfig("bench", SourceSpec(video, policy="offline"))
    process = mp.get_context("spawn").Process(target=decode.main, args=(config, wiring))
    readers = RingReaders()
    frames, start = 0, 0.0
    process.start()
    try:
        while True:
            raw = inbox.recv(60.0)
            assert raw is not None, "the decode process stopped sending"
            if not frames:
                start = time.perf_counter()  # from the first frame: process start-up is not decoding
            received = unpack(raw, readers)
            message = received.message
            done = isinstance(message, EndOfStream)
            if isinstance(message, Frame):
                int(message.image[0, :64].sum())
                frames += 1
            received.release()
            del received, message
            if done:
                break
        seconds = time.perf_counter() - start
    finally:
        process.terminate()
        process.join()
        inbox.close()
        readers.close()
    # the first frame started the clock: frames - 1 intervals
    return frames - 1, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help=f"default {DEFAULT_VIDEO}; with --smoke the generated sample clip")
    parser.add_argument("--rounds", type=int, default=5)
    add_output_options(parser)
    args = parse_args(parser, {"rounds": 1})
    with tempfile.TemporaryDirectory(prefix="maskstream-smoke-") as folder:
        if args.video is None:
            args.video = str(write_sample_clip(Path(folder)) if args.smoke else DEFAULT_VIDEO)
        if not Path(args.video).is_file():
            parser.error(f"{args.video}: no such video (pass --video)")
        out = results_file(parser, args, f"decode_{Path(args.video).stem.replace('-', '_')}.json")
        measure(args, out)
    return 0


def measure(args: argparse.Namespace, out: Path) -> None:
    sides = ["pyav_decode", "decode_stage", "decode_process"]
    skipped = {}
    if shutil.which("ffmpeg"):
        sides.insert(0, "ffmpeg_cli")
    else:
        skipped["ffmpeg_cli"] = "no ffmpeg binary on this machine (PyAV's wheel carries FFmpeg's libraries only)"
    load_before = os.getloadavg()
    rows: dict[str, list[float]] = {side: [] for side in sides}
    frames_seen: dict[str, int] = {}
    ring = Ring.create(f"msk-bench-decode-{os.getpid()}", 8, SLOT_BYTES)
    try:
        with tempfile.TemporaryDirectory(prefix="msk-bench-") as directory:
            pyav_decode(args.video)  # warm the file cache and the libraries once, untimed
            for _ in range(args.rounds):
                for side in sides:  # interleaved, so drift in the host's load hits every side alike
                    if side == "ffmpeg_cli":
                        n, seconds = ffmpeg_cli(args.video)
                    elif side == "pyav_decode":
                        n, seconds = pyav_decode(args.video)
                    elif side == "decode_stage":
                        n, seconds = decode_stage(args.video, ring)
                    else:
                        n, seconds = decode_process(args.video, ring, directory)
                    rows[side].append(n / seconds)
                    frames_seen[side] = n
    finally:
        ring.close(unlink=True)
    median = {side: statistics.median(values) for side, values in rows.items()}
    ratios = {f"{side}_over_pyav_decode": median[side] / median["pyav_decode"] for side in sides}
    if "ffmpeg_cli" in median:
        ratios.update({f"{side}_over_ffmpeg_cli": median[side] / median["ffmpeg_cli"] for side in sides})
    with av.open(args.video) as container:
        stream = container.streams.video[0]
        first = next(container.decode(stream))
        video = {"path": args.video, "codec": stream.codec_context.name, "width": stream.width,
                 "height": stream.height, "frames": frames_seen.get("pyav_decode"), "pixel_format": first.format.name,
                 "full_range": first.color_range == 2}
    result = {
        "what": "decode frames/s of one video file: FFmpeg's own decoding (ffmpeg CLI, PyAV without conversion) vs "
                "our decode stage (in one process; and as its own process through the ring and ZeroMQ), median over "
                "interleaved rounds",
        "video": video, "rounds": rows, "median_fps": median, "ratios": ratios, "skipped": skipped,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "pyav": av.__version__, "ffmpeg": av.library_versions,
                    "numpy": np.__version__, "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "command": "python " + shlex.join(sys.argv),
        "smoke": args.smoke,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{video['path']}: {video['codec']} {video['width']}x{video['height']} {video['pixel_format']}, "
          f"{video['frames']} frames; "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    for side, why in skipped.items():
        print(f"{side}: skipped: {why}")
    cli = "ffmpeg_cli" in median
    print(f"{'side':<16} {'frames/s (median)':>18} {'/ pyav_decode':>14}{' / ffmpeg_cli' if cli else ''}   rounds")
    for side in sides:
        over_cli = f"{ratios[f'{side}_over_ffmpeg_cli']:>13.3f}" if cli else ""
        print(f"{side:<16} {median[side]:>18.1f} {ratios[f'{side}_over_pyav_decode']:>14.3f}{over_cli}   "
              + ", ".join(f"{v:.1f}" for v in rows[side]))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
