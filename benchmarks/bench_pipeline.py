"""Pipeline efficiency: end-to-end frames/s of the multi-process pipeline divided by the
frames/s of a bare single-process loop (decode + the same preprocess, runner and postprocess,
one frame after another, with the decode stage's pixel route: pipeline.media.pixels.frame_pixels)
on the same video and runner, measured side by side in one run.

    python benchmarks/bench_pipeline.py [--model bundled|tiny] [--video PATH] [--rounds 2] [--set KEY=VALUE]

--model bundled: the product's default (the bundled lite model, 320x576, K=20); tiny: the
untrained lite variant shrunk to 192x256, K=10, about 4x less inference per frame, so the
other stages' CPU weighs 4x more: the harder case on a 2-core host, where the inference
process already keeps both cores busy and every other stage's CPU time comes out of its share.

Both sides exclude start-up (model build, process spawn): the bare loop is timed from its
first frame, the pipeline from the first frame it published, to the last. Rounds alternate
bare / pipeline so that drift in the host's load hits both. Writes
benchmarks/results/pipeline_efficiency_<model>.json with the machine description.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from maskstream.model.runners import configure_process
from maskstream.pipeline.cli.main import build_parser
from maskstream.pipeline.cli.run import run_config
from maskstream.pipeline.media.pixels import PixelRoute
from maskstream.pipeline.media.sources import SourceSpec, VideoSource
from maskstream.pipeline.run_config import RunConfig, plan
from maskstream.pipeline.runtime.messages import Frame, Header, RawDetections
from maskstream.pipeline.runtime.supervisor import SteadyRate, Supervisor
from maskstream.pipeline.stages.infer import InferConfig, InferStage
from maskstream.pipeline.stages.postprocess import PostprocessStage
from maskstream.pipeline.stages.preprocess import PreprocessStage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_VIDEO = ROOT.parent / "shared" / "data" / "videos" / "asl_walk.mkv"
MODELS = {
    "bundled": [],
    "tiny": ["model.config=configs/model_lite.yaml", "model.static.height=192", "model.static.width=256",
             "model.static.detections=10", "model.roi_heads.detections_per_img=10",
             "model.rpn.pre_nms_top_n_test=200", "model.rpn.post_nms_top_n_test=100"],
}


def bare_loop(cfg: RunConfig, video: str) -> tuple[int, float]:
    """Frames and seconds of decode -> preprocess -> infer -> postprocess in one process."""
    the_plan = plan(cfg)  # the same stage configs the pipeline gets
    try:
        configs = {spec.name.split(".")[0]: spec.config for spec in the_plan.specs}
    finally:
        the_plan.close()
    torch.set_num_threads(os.cpu_count() or 1)
    cv2.setNumThreads(1)
    infer_cfg: InferConfig = configs["infer"]
    configure_process(infer_cfg.runner.tf32)  # as the inference stage's entry point does
    runner_stage = InferStage(infer_cfg)
    pre, post = PreprocessStage(configs["preprocess"]), PostprocessStage(configs["postprocess"])
    frames, start = 0, 0.0
    pixels = PixelRoute(lambda shape: np.empty(shape, dtype=np.uint8))
    with VideoSource(SourceSpec(video, policy="offline"), convert=pixels) as source:
        for decoded in source:
            if frames == 1:
                start = time.perf_counter()  # the first frame pays lazy initialisation: not timed
            model_input = pre.process(Frame(Header("bench", decoded.index), decoded.image, pixels.format))
            [raw] = runner_stage.process(model_input)
            assert isinstance(raw, RawDetections)
            post.process(raw)
            frames += 1
    return frames - 1, time.perf_counter() - start


def pipeline(cfg: RunConfig) -> tuple[int, float]:
    the_plan = plan(cfg)
    rate = SteadyRate()  # what `maskstream run` reports as frames/s after the first
    try:
        report = Supervisor(the_plan.specs, the_plan.reports, the_plan.streams, cfg.supervisor).run(rate.update)
    finally:
        the_plan.close()
    if report.failure or report.failed_streams:
        raise RuntimeError(f"pipeline run failed: {report}")
    return rate.frames, rate.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--video", default=str(DEFAULT_VIDEO))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--model", choices=sorted(MODELS), default="bundled")
    args = parser.parse_args()
    if not Path(args.video).is_file():
        sys.exit(f"{args.video}: no such video (pass --video)")
    # The configuration `maskstream run` would build from these options (its own parser and defaults).
    sets = [item for value in (*MODELS[args.model], *args.set) for item in ("--set", value)]
    cfg = run_config(build_parser().parse_args(
        ["run", "--source", args.video, "--workers", str(args.workers), "--policy", "offline", "--device", "cpu",
         *sets]))
    transport = dataclasses.replace(cfg.transport, endpoint_dir=Path(tempfile.gettempdir()))
    cfg = dataclasses.replace(cfg, transport=transport)
    load_at_start = os.getloadavg()
    rows: dict[str, list[float]] = {"bare_loop_fps": [], "pipeline_fps": []}
    for _ in range(args.rounds):
        n, seconds = bare_loop(cfg, args.video)
        rows["bare_loop_fps"].append(n / seconds)
        n, seconds = pipeline(cfg)
        rows["pipeline_fps"].append(n / seconds)
    bare, piped = statistics.median(rows["bare_loop_fps"]), statistics.median(rows["pipeline_fps"])
    result = {
        "what": "end-to-end frames/s of the multi-process pipeline / frames/s of a bare single-process loop, "
                "same video, same runner, start-up excluded, median over rounds",
        "video": args.video, "model": args.model, "model_overrides": [*MODELS[args.model], *args.set],
        "workers": args.workers,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "rounds": rows, "bare_loop_fps": bare, "pipeline_fps": piped, "efficiency": piped / bare, "goal": 0.9,
    }
    out = RESULTS / f"pipeline_efficiency_{args.model}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'side':<14} {'frames/s (median)':>18}   rounds")
    for name, values in rows.items():
        print(f"{name:<14} {statistics.median(values):>18.2f}   {', '.join(f'{v:.2f}' for v in values)}")
    print(f"efficiency = pipeline / bare = {piped / bare:.3f} (goal >= 0.9); load average {load_at_start[0]:.2f} at "
          f"start, {os.getloadavg()[0]:.2f} at end; wrote {out}")


if __name__ == "__main__":
    main()
