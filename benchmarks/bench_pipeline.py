"""Pipeline efficiency: end-to-end frames/s of the multi-process pipeline divided by the frames/s
of a bare single-process loop of the same stages, on the same video and runner, measured side by
side in one run.

    python benchmarks/bench_pipeline.py [--model bundled tiny] [--video PATH ...] [--rounds 3]
        [--max-frames N] [--workers 1] [--set KEY=VALUE] [--out PATH] [--smoke]

--model bundled: the product's default (the bundled lite model, 320x576, K=20); tiny: the
untrained lite variant shrunk to 192x256, K=10, about 4x less inference per frame, so the
other stages' CPU weighs 4x more: the harder case on a 2-core host, where the inference
process already keeps both cores busy and every other stage's CPU time comes out of its share.
Several models and videos are measured in one run, side by side.

The bare loop is built from what the pipeline runs: the stage configs pipeline.run_config.plan()
hands the stage processes, the stage objects made from them, each message through the stages'
process() in pipeline order and, once the source has ended, their flush(), as the stage loop
(pipeline.runtime.stage) would call them: the pipeline less its processes, sockets and rings.

Both sides exclude start-up (model build, process spawn): frames/s is (N - 1) / the time from
the first frame out of the last stage to the last one, the bare loop's taken as each frame comes
out, the pipeline's from the frames' publish stamps, as `maskstream bench` measures throughput
(pipeline.bench.measure). Rounds alternate bare / pipeline over every model and video, so that
drift in the host's load hits all sides alike. On a shared host other processes' work slows
whichever side it overlaps (with torch's threads on every core, a busy neighbour can slow a side
many times over), so every side records the load average before it (what `uptime` shows) and
the share of the cores other processes used while it ran (/proc/stat less our own CPU time);
--wait-quiet starts each side only once the host is idle. Writes pipeline_efficiency.json (see --out).

--smoke: the tiny model, 6 frames, one round, on the generated sample clip unless --video.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import torch
from golden_state import SHARED  # benchmarks/, beside this script
from maskstream.configs import CONFIG_DIR
from maskstream.model.runners import configure_process
from maskstream.pipeline.bench.measure import machine, measure, summarize
from maskstream.pipeline.bench.smoke import SMOKE_FRAMES
from maskstream.pipeline.cli.main import build_parser
from maskstream.pipeline.cli.run import run_config
from maskstream.pipeline.run_config import RunConfig, plan, write_sample_clip
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, Message
from maskstream.pipeline.runtime.stage import Timed
from maskstream.pipeline.stages import decode, infer, postprocess, preprocess, publish
from options import add_output_options, parse_args, results_file

DEFAULT_VIDEO = SHARED / "data" / "videos" / "asl_walk.mkv"
MODELS = {
    "bundled": [],
    "tiny": [f"model.config={CONFIG_DIR / 'model_lite.yaml'}", "model.static.height=192", "model.static.width=256",
             "model.static.detections=10", "model.roi_heads.detections_per_img=10",
             "model.rpn.pre_nms_top_n_test=200", "model.rpn.post_nms_top_n_test=100"],
}
# The stage object of each stage kind in a plan: a kind the plan gains is an error here until the
# bare loop runs it too.
STAGES = {"decode": decode.DecodeStage, "preprocess": preprocess.PreprocessStage, "infer": infer.InferStage,
          "postprocess": postprocess.PostprocessStage, "publish": publish.PublishStage}


def messages_out(stage: str, result: Any) -> list[Message]:
    """A stage's process() or flush() result as the stage loop takes it: None, one output or a
    sequence of them, an output being a Message or a Timed one. Anything else is an error here,
    as it is there."""
    items = [] if result is None else list(result) if isinstance(result, Sequence) else [result]
    out = []
    for item in items:
        message = item.message if isinstance(item, Timed) else item
        if not isinstance(message, Message):  # type: ignore[arg-type]  # a union of message classes
            raise TypeError(f"{stage}: gave a {type(item).__name__}, not a message the stage loop can send")
        out.append(message)
    return out


def bare_loop(cfg: RunConfig) -> tuple[int, float]:
    """Frames and seconds (first frame out to last) of cfg's stages run one after another in this process."""
    the_plan = plan(cfg)  # the configs the stage processes would get
    the_plan.close()  # its rings and sockets are not used here
    specs = {}
    for spec in the_plan.specs:  # pipeline order; with several workers their configs are the same
        specs.setdefault(spec.wiring.kind, spec)
    if len(the_plan.streams) != 1:
        raise ValueError(f"the bare loop runs one stream, the plan has {len(the_plan.streams)}")
    unknown = set(specs) - set(STAGES)
    if unknown:
        raise ValueError(f"stages {sorted(unknown)}: the bare loop does not know how to make them")
    # What pipeline.runtime.stage sets up in each stage process; threads as the inference process's.
    cv2.setNumThreads(1)
    if specs["infer"].wiring.torch_threads:
        torch.set_num_threads(specs["infer"].wiring.torch_threads)
    torch.set_flush_denormal(True)
    configure_process(specs["infer"].config.runner.tf32)  # as the inference stage's entry point does
    source = STAGES["decode"](specs["decode"].config)  # without a ring: ordinary arrays
    stages = [(kind, STAGES[kind](spec.config)) for kind, spec in specs.items() if kind != "decode"]
    last = stages[-1][0]
    out_at: list[float] = []
    ends: list[EndOfStream] = []

    def through(messages: list[Message], rest: list[tuple[str, Any]]) -> None:
        for kind, stage in rest:
            messages = [out for message in messages for out in messages_out(f"{kind}.process", stage.process(message))]
        for message in messages:
            if isinstance(message, Detections) and not ends:
                out_at.append(time.perf_counter())
            elif isinstance(message, EndOfStream):
                ends.append(message)
            else:
                raise TypeError(f"{last} gave a {type(message).__name__} (after {len(out_at)} frames and "
                                f"{len(ends)} ends of stream): expected Detections, then one EndOfStream")

    for message in source.messages():
        through([message], stages)
    for i, (kind, stage) in enumerate(stages):  # the stage loop flushes a stage that nothing reaches any more
        flush = getattr(stage, "flush", None)
        if flush is not None:
            through(messages_out(f"{kind}.flush", flush()), stages[i + 1:])
    for _, stage in stages:
        close = getattr(stage, "close", None)
        if close is not None:
            close()
    if len(ends) != 1 or ends[0].error:
        raise RuntimeError(f"the stream ended {len(ends)} times: {[end.error for end in ends]}")
    if len(out_at) != source.sent or len(out_at) < 2:
        raise RuntimeError(f"{source.sent} frames decoded, {len(out_at)} came out of {last}")
    return len(out_at) - 1, out_at[-1] - out_at[0]


def pipeline(cfg: RunConfig) -> tuple[int, float]:
    """Frames and seconds (first frame published to last) of cfg's multi-process pipeline."""
    summary = summarize(measure(cfg), "offline")
    published = summary["frames"]["published"]
    if summary["throughput_fps"] is None:
        raise RuntimeError(f"{published} frames published: too few for a rate")
    return published - 1, (published - 1) / summary["throughput_fps"]


def host_cpu_s() -> float:
    """CPU seconds every process on the host has used since boot, all cores together (/proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have exited (the stage processes, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(usage.ru_utime + usage.ru_stime for usage in own)


def accounted(side: Callable[[RunConfig], tuple[int, float]], cfg: RunConfig) -> tuple[int, float, float]:
    """side(cfg)'s (frames, seconds) and the share of the host's cores that other processes used
    meanwhile: on a shared host, what slowed this side and maybe not the other."""
    wall, host, own = time.monotonic(), host_cpu_s(), own_cpu_s()
    frames, seconds = side(cfg)
    others = (host_cpu_s() - host) - (own_cpu_s() - own)
    return frames, seconds, max(0.0, others) / ((time.monotonic() - wall) * (os.cpu_count() or 1))


def wait_quiet(busy_below: float, limit_s: float) -> float:
    """Seconds waited (at most limit_s) until the host's cores were less than `busy_below` busy over a second."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = host_cpu_s()
        time.sleep(1.0)
        if (host_cpu_s() - before) / (os.cpu_count() or 1) < busy_below:
            break
    return time.monotonic() - start


@contextlib.contextmanager
def videos(given: list[str] | None, smoke: bool) -> Iterator[list[str]]:
    """The videos to measure: --video, else the default clip, else (--smoke) the generated sample clip."""
    if given:
        yield given
    elif smoke:
        with tempfile.TemporaryDirectory(prefix="maskstream-smoke-") as folder:
            yield [str(write_sample_clip(Path(folder)))]
    else:
        yield [str(DEFAULT_VIDEO)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", nargs="+", metavar="PATH", help=f"default {DEFAULT_VIDEO}")
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["bundled"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-frames", type=int, metavar="N", help="end the video after N frames")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run config override")
    parser.add_argument("--wait-quiet", type=float, metavar="FRACTION",
                        help="before each side, wait (up to --quiet-limit s) until the host's cores are less than "
                             "FRACTION busy: other processes' work slows one side and maybe not the other")
    parser.add_argument("--quiet-limit", type=float, default=600.0, metavar="SECONDS")
    add_output_options(parser)
    args = parse_args(parser, {"model": ["tiny"], "rounds": 1, "max_frames": SMOKE_FRAMES})
    out = results_file(parser, args, "pipeline_efficiency.json")
    if args.rounds < 1 or args.workers < 1:
        parser.error("--rounds and --workers: at least 1")
    for video in args.video or []:
        if not Path(video).is_file():
            parser.error(f"--video {video}: no such file")
    if not args.video and not args.smoke and not DEFAULT_VIDEO.is_file():
        parser.error(f"{DEFAULT_VIDEO}: no such video (pass --video)")

    with videos(args.video, args.smoke) as paths:
        def config(model: str, video: str) -> RunConfig:
            """The configuration `maskstream run` would build from these options (its own parser and defaults)."""
            sets = [*MODELS[model], *(["source.max_frames=" + str(args.max_frames)] if args.max_frames else []),
                    *args.set]
            cfg = run_config(build_parser().parse_args(
                ["run", "--source", video, "--workers", str(args.workers), "--policy", "offline", "--device", "cpu",
                 *(item for value in sets for item in ("--set", value))]))
            return dataclasses.replace(cfg, transport=dataclasses.replace(cfg.transport,
                                                                          endpoint_dir=Path(tempfile.gettempdir())))

        runs = [{"model": model, "model_overrides": MODELS[model], "video": video, "config": config(model, video),
                 "bare_loop_fps": [], "pipeline_fps": [],
                 **{key: {"bare_loop": [], "pipeline": []}
                    for key in ("load_average_before", "others_cpu_share", "waited_quiet_s")}}
                for video in paths for model in args.model]
        at_start = machine()
        for done in range(1, args.rounds + 1):
            for run in runs:  # every side of every run once per round: drift hits them alike
                for side, measured in (("bare_loop", bare_loop), ("pipeline", pipeline)):
                    if args.wait_quiet is not None:
                        run["waited_quiet_s"][side].append(wait_quiet(args.wait_quiet, args.quiet_limit))
                    run["load_average_before"][side].append(os.getloadavg())
                    frames, seconds, others = accounted(measured, run["config"])
                    run[f"{side}_fps"].append(frames / seconds)
                    run["others_cpu_share"][side].append(others)
                    run["frames"] = frames + 1
                    print(f"round {done}: {run['model']} {Path(run['video']).name} {side} {frames / seconds:.2f} "
                          f"frames/s (load average {run['load_average_before'][side][-1][0]:.2f} before; other "
                          f"processes used {others:.0%} of the cores meanwhile)", file=sys.stderr)
                    # after every side: a run cut short still leaves every side it finished
                    result = results(args, at_start, runs)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(result, indent=2) + "\n")
    runs = result["runs"]
    print(f"{'model':<8} {'video':<20} {'frames':>6} {'bare f/s':>9} {'pipeline f/s':>12} {'efficiency':>10}   "
          "per round (pipeline / bare)")
    for run in runs:
        print(f"{run['model']:<8} {Path(run['video']).name:<20} {run['frames']:>6} {run['bare_loop_fps_median']:>9.2f} "
              f"{run['pipeline_fps_median']:>12.2f} {run['efficiency']:>10.3f}   "
              + ", ".join(f"{p:.2f}/{b:.2f}" for p, b in zip(run["pipeline_fps"], run["bare_loop_fps"])))
    load = result["machine"]
    print(f"goal >= 0.9; load average {load['load_average_at_start'][0]:.2f} at start, "
          f"{load['load_average_at_end'][0]:.2f} at end; wrote {out}")
    return 0


def results(args: argparse.Namespace, at_start: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of the sides measured so far ("rounds": how many rounds every side has finished; a
    median or an efficiency is null until its sides have a figure)."""
    rows = []
    for run in runs:
        bare, piped = (statistics.median(run[key]) if run[key] else None for key in ("bare_loop_fps", "pipeline_fps"))
        rows.append({**{key: value for key, value in run.items() if key != "config"},
                     "bare_loop_fps_median": bare, "pipeline_fps_median": piped,
                     "efficiency": piped / bare if piped is not None and bare is not None else None,
                     "efficiency_per_round": [p / b for p, b in zip(run["pipeline_fps"], run["bare_loop_fps"])]})
    rounds = min(len(run[key]) for run in runs for key in ("bare_loop_fps", "pipeline_fps"))
    return {
        "what": "end-to-end frames/s of the multi-process pipeline / frames/s of a bare single-process loop of the "
                "same stages, same video, same runner, start-up excluded, median over interleaved rounds",
        "command": "python " + shlex.join(sys.argv),
        "smoke": args.smoke,
        "machine": {**at_start, "load_average_at_start": at_start["load_average"],
                    "load_average_at_end": os.getloadavg()},
        "rounds": rounds, "workers": args.workers, "max_frames": args.max_frames, "overrides": args.set,
        "goal": 0.9,
        "runs": rows,
    }


if __name__ == "__main__":
    sys.exit(main())
