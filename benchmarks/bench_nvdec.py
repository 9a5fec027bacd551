"""Decode on NVDEC vs on the CPU, side by side in one run: frames/s and CPU cores used.

Each side is the decode stage's own work in this process (pipeline.stages.decode.DecodeStage:
decoding, each frame's 4:2:0 planes written into an array, its Frame message), on a 1080p H.264
clip (the synthetic clip writer's, made here, unless --video), rounds interleaved, medians
reported. CPU cores = the process's CPU time (every thread: FFmpeg's decode threads are ours)
over the wall time. NVDEC where FFmpeg cannot open a CUDA device is left out, with the reason.

    python benchmarks/bench_nvdec.py [--video PATH] [--frames 300] [--rounds 3] [--out DIR]
    python benchmarks/bench_nvdec.py --smoke        # a tiny clip, one round, any machine
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.media.hwdecode import hwaccel, nvdec_problem
from maskstream.pipeline.media.sources import SourceSpec
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.runtime.messages import Frame
from maskstream.pipeline.stages import decode
from options import add_output_options, parse_args, results_file  # benchmarks/options.py, beside this script


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def decode_once(video: str, decoder: str) -> dict[str, float]:
    stage = decode.DecodeStage(decode.DecodeConfig("bench", SourceSpec(video, policy="offline", decoder=decoder)))
    frames, wall, cpu = 0, time.perf_counter(), _cpu_s()
    for message in stage.messages():
        if isinstance(message, Frame):
            frames += 1
    if stage.error:
        raise RuntimeError(f"{decoder}: {stage.error}")
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    return {"frames": frames, "seconds": wall, "fps": frames / wall, "cpu_cores": cpu / wall}


def hardware_check(video: str) -> dict[str, Any]:
    """Whether the clip's stream really decodes on the device: FFmpeg's hwaccel attached, and the
    format frames arrive in (NV12 when downloaded from CUDA)."""
    with av.open(video, hwaccel=hwaccel("nvdec")) as container:
        stream = container.streams.video[0]
        frame = next(container.decode(stream))
        return {"codec": stream.codec_context.name, "is_hwaccel": stream.codec_context.is_hwaccel,
                "frame_format": frame.format.name}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="an H.264/HEVC clip (default: a synthetic 1920x1080 H.264 clip made here)")
    parser.add_argument("--size", default="1920x1080", help="the synthetic clip's WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=300, help="the synthetic clip's frames")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoders", nargs="+", choices=["cpu", "nvdec"], default=["cpu", "nvdec"])
    add_output_options(parser)
    args = parse_args(parser, {"size": "192x108", "frames": 12, "rounds": 1}, argv)
    out = results_file(parser, args, "nvdec_decode.json")
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        video = args.video or str(write_test_clip(Path(tmp) / "clip_1080p.mp4", frames=args.frames,
                                                  size=(width, height), fps=30.0, codec="libx264"))
        problem = nvdec_problem() if "nvdec" in args.decoders else None
        decoders = [d for d in args.decoders if d != "nvdec" or problem is None]
        result: dict[str, Any] = {"benchmark": "bench_nvdec", "command": "python " + shlex.join(sys.argv),
                                  "smoke": args.smoke, "machine": machine(), "video": args.video or
                                  f"synthetic {width}x{height} H.264, {args.frames} frames", "rounds": args.rounds,
                                  "nvdec_unavailable": problem, "sides": {}}
        if problem is None and "nvdec" in decoders:
            result["nvdec_check"] = hardware_check(video)
        runs: dict[str, list[dict[str, float]]] = {d: [] for d in decoders}
        for _ in range(args.rounds):
            for d in decoders:
                runs[d].append(decode_once(video, d))
    for d, rows in runs.items():
        result["sides"][d] = {"fps": statistics.median(r["fps"] for r in rows),
                              "cpu_cores": statistics.median(r["cpu_cores"] for r in rows),
                              "frames": rows[0]["frames"], "rounds": rows}
    if {"cpu", "nvdec"} <= set(runs):
        cpu, gpu = result["sides"]["cpu"], result["sides"]["nvdec"]
        result["nvdec_over_cpu_fps"] = gpu["fps"] / cpu["fps"]
        result["cpu_cores_per_100_fps"] = {d: s["cpu_cores"] / s["fps"] * 100 for d, s in result["sides"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'decoder':<8} {'frames/s':>9} {'CPU cores':>10}")
    for d, side in result["sides"].items():
        print(f"{d:<8} {side['fps']:>9.1f} {side['cpu_cores']:>10.2f}")
    if problem is not None:
        print(f"nvdec: left out: {problem}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
