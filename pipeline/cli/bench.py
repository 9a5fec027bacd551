"""`maskstream bench`: run the real pipeline and report per-stage and end-to-end throughput,
latency percentiles, drops, CPU/memory per process (GPU memory where there is a GPU); a table
on stdout, JSON and PNG plots beside --out. Measurement: pipeline.bench.measure; plots: pipeline.bench.plots.

    maskstream bench --source clip.mp4                                # offline: maximum throughput
    maskstream bench --source clip.mp4 --mode live --rate 30 --streams 2
    maskstream bench --source clip.mp4 --mode live --find-rate --p99-bound 1.5
    maskstream bench --smoke                                          # tiny sizes: does it work?

Offline reads every frame as fast as the pipeline takes them (no drops). Live plays each file
as a camera at --rate frames/s (per stream, --streams copies): latency stays bounded and
frames are dropped, counted, when the pipeline cannot keep up. --find-rate runs the pipeline
at a series of rates (each a short run) and reports the highest whose p99 end-to-end latency
is under --p99-bound with a drop rate of at most --max-drop-rate.

Settings as for `maskstream run` (configs/pipeline.yaml, --set, --model-config, ...). Without
--source, the generated sample clip (synthetic shapes). --smoke runs at the tiny sizes of
pipeline.bench.smoke (the tiny lite model, 6 frames per stream unless --max-frames; options given
keep their values): figures that mean nothing, for checking that the bench works, as CI does.
Exit status: 0 done, 2 bad input or a failed run (the message says which).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskstream.configs import CONFIG_DIR
from maskstream.pipeline.cli.options import add_logging, add_progress, config_file, subcommand
from maskstream.pipeline.cli.run import add_model_selection, run_config
from maskstream.pipeline.config import ConfigError

if TYPE_CHECKING:  # the handlers import these themselves: see cli/main.py
    from maskstream.pipeline.run_config import ChosenModel, RunConfig

log = logging.getLogger("maskstream.bench")

EXAMPLES = """
  maskstream bench --max-frames 40                                   # the sample clip; results in runs/bench-N
  maskstream bench --source clip.mp4 --model maskrcnn_resnet50_fpn_coco --device cuda --precision fp16
  maskstream bench --source clip.mp4 --mode live --rate 30 --streams 2
  maskstream bench --source clip.mp4 --mode live --find-rate --p99-bound 1.5
"""


def add_parsers(subparsers: Any) -> None:
    """Add `bench` to the CLI's subparsers."""
    p = subcommand(subparsers, "bench", "benchmark the pipeline: throughput, latency, drops, CPU/memory", EXAMPLES)
    p.add_argument("--source", action="append", default=[], metavar="URL",
                   help="video file or stream (repeatable); default: the generated sample clip")
    p.add_argument("--mode", choices=["offline", "live"], default="offline",
                   help="offline: every frame as fast as possible; live: played at --rate, stale frames dropped")
    p.add_argument("--rate", type=float, metavar="FPS", help="live: frames/s each stream is played at")
    p.add_argument("--streams", type=int, default=1, metavar="N", help="copies of each source run side by side")
    p.add_argument("--max-frames", type=int, metavar="N", help="end each stream after N frames (default: all)")
    p.add_argument("--duration", type=float, default=10.0, metavar="SECONDS",
                   help="live without --max-frames: frames = rate x duration (the file may end sooner)")
    p.add_argument("--find-rate", action="store_true", help="live: search the highest sustained rate")
    p.add_argument("--p99-bound", type=float, default=2.0, metavar="SECONDS",
                   help="--find-rate: a rate is sustained when end-to-end p99 is at most this")
    p.add_argument("--max-drop-rate", type=float, default=0.05, metavar="FRACTION",
                   help="--find-rate: ... and at most this fraction of frames is dropped after warm-up")
    p.add_argument("--start-rate", type=float, default=2.0, metavar="FPS", help="--find-rate: first rate tried")
    p.add_argument("--search-steps", type=int, default=3, help="--find-rate: bisection runs after bracketing")
    p.add_argument("--out", type=Path,
                   help="JSON results; the plots go beside it (NAME_latency.png, NAME_throughput.png, ...) "
                        "(default: a new runs/bench-N/bench.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier bench at --out")
    p.add_argument("--no-plots", action="store_true", help="JSON and table only")
    p.add_argument("--config", type=config_file, default=CONFIG_DIR / "pipeline.yaml", help="pipeline YAML (RunConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--workers", type=int, help="preprocess and postprocess processes, each (default: config's, 1)")
    add_model_selection(p)
    p.add_argument("--publish", metavar="ENDPOINT", help="publish (and measure) here instead of a private ipc socket")
    add_progress(p)
    add_logging(p)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (the tiny lite model, a few frames): checks that the bench works, measures nothing")
    p.set_defaults(func=bench)


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the first bad option."""
    from maskstream.pipeline.media.sources import resolve_policy

    if args.rate is not None and not (args.rate > 0 and math.isfinite(args.rate)):
        raise ValueError(f"--rate: expected frames/s > 0, got {args.rate}")
    if args.mode == "live" and args.rate is None and not args.find_rate:
        raise ValueError("--mode live needs --rate FPS (or --find-rate)")
    if args.find_rate and args.mode != "live":
        raise ValueError("--find-rate searches live rates: add --mode live")
    if args.mode == "offline" and args.rate is not None:
        raise ValueError("--rate paces live sources: add --mode live (offline reads as fast as it can)")
    for name, value, low in (("--streams", args.streams, 1), ("--max-frames", args.max_frames, 1),
                             ("--search-steps", args.search_steps, 0)):
        if value is not None and value < low:
            raise ValueError(f"{name}: expected >= {low}, got {value}")
    for name, value in (("--duration", args.duration), ("--p99-bound", args.p99_bound),
                        ("--start-rate", args.start_rate)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name}: expected > 0, got {value}")
    if not 0 <= args.max_drop_rate < 1:
        raise ValueError(f"--max-drop-rate: expected a fraction in [0, 1), got {args.max_drop_rate}")
    for url in args.source:
        if resolve_policy(url) == "offline" and "://" not in url and not Path(url).is_file():
            raise ValueError(f"--source {url}: no such video file")


def bench_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of `maskstream run` with the same options, without file outputs."""
    from maskstream.pipeline.bench.measure import repeat_sources

    namespace = argparse.Namespace(**{**vars(args), "out": None, "coco": None, "annotate": None, "metrics_port": None,
                                      "policy": None})
    cfg = run_config(namespace)
    source = dataclasses.replace(cfg.source, max_frames=args.max_frames)
    if args.mode == "offline":
        source = dataclasses.replace(source, policy="offline")
    return dataclasses.replace(cfg, sources=repeat_sources(cfg.sources, args.streams) if args.mode == "offline"
                               else cfg.sources, source=source)


def smoke_args(args: argparse.Namespace) -> argparse.Namespace:
    """args at the tiny sizes of pipeline.bench.smoke; --set items and --max-frames given keep their values."""
    from maskstream.pipeline.bench.smoke import SMOKE_FRAMES, tiny_run_overrides

    return argparse.Namespace(**{**vars(args), "set": [*tiny_run_overrides(), *args.set],
                                 "max_frames": args.max_frames or SMOKE_FRAMES})


def bench(args: argparse.Namespace) -> int:
    from maskstream.pipeline.bench.measure import (
        BenchError,
        machine,
        repeat_sources,
        search_rate,
        summarize,
        table,
    )
    from maskstream.pipeline.bench.plots import write_plots
    from maskstream.pipeline.cli.files import new_run_dir, refuse_existing
    from maskstream.pipeline.cli.run import Refused, check_device, load_model, probe_sources
    from maskstream.pipeline.run_config import source_specs, write_sample_clip

    if args.smoke:
        args = smoke_args(args)
    try:
        check_args(args)
        cfg = bench_config(args)
        out = args.out if args.out is not None else new_run_dir(Path("runs"), "bench") / "bench.json"
        refuse_existing([out], args.overwrite)
        if not cfg.sources:
            clip = write_sample_clip(out.parent)
            log.info("no --source given: benchmarking the generated sample clip %s", clip)
            cfg = dataclasses.replace(cfg, sources=repeat_sources((str(clip),), args.streams)
                                      if args.mode == "offline" else (str(clip),))
        totals = {sid: probe.frames for sid, probe in probe_sources(source_specs(cfg)).items()}
        check_device(cfg.model)
        chosen = load_model(cfg.model)
        model = _model_description(cfg, chosen)
        if not model["trained"]:
            log.warning("untrained detection heads (no checkpoint): timings are real, detections are not meaningful")
        result: dict[str, Any] = {
            "command": "maskstream " + shlex.join(sys.argv[1:]), "machine": machine(), "model": model,
            "sources": list(cfg.sources), "mode": args.mode,
            "streams": args.streams, "max_frames": args.max_frames, "smoke": args.smoke, "run": None,
            "rate_search": None, "plots": [],
        }
        if args.mode == "offline":
            result["run"] = summarize(_measure(cfg, args, chosen, totals), "offline")
        elif args.rate is not None:
            result["run"] = _live_run(cfg, args, args.rate, chosen)
        if args.find_rate:
            def run_at(rate: float) -> dict[str, Any]:
                summary = _live_run(cfg, args, rate, chosen)
                log.info("%g frames/s x %d: p99 %s, drop rate %.1f%%, %.2f frames/s published", rate, args.streams,
                         _s(summary["end_to_end_s"], "p99"), 100 * summary["drops"]["drop_rate"],
                         summary["throughput_fps"] or 0)
                return summary

            log.info("searching the highest rate with p99 <= %g s and drop rate <= %.0f%% ...", args.p99_bound,
                     100 * args.max_drop_rate)
            result["rate_search"] = search_rate(run_at, args.start_rate, args.p99_bound, args.max_drop_rate,
                                                args.search_steps)
    except Refused as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (BenchError, ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["machine"]["load_average_at_end"] = machine()["load_average"]
    label = f"{Path(cfg.sources[0]).stem} {model['variant']} {args.mode}"
    if result["run"] is not None:
        print(table(result["run"]))
        if not args.no_plots:
            result["plots"] = [str(p) for p in write_plots(out.with_suffix(""), result["run"], label)]
    if result["rate_search"] is not None:
        search = result["rate_search"]
        print(f"highest sustained rate: {search['highest_sustained_fps']} frames/s per stream x {args.streams} "
              f"(p99 <= {search['p99_bound_s']} s, drops <= {search['max_drop_rate']:.0%}); lowest failed: "
              f"{search['lowest_failed_fps']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote " + ", ".join([str(out), *result["plots"]]))
    return 0


def _measure(cfg: RunConfig, args: argparse.Namespace, chosen: ChosenModel | None,
             totals: dict[str, int | None]) -> Any:
    """One measured run, with the same progress as `maskstream run`'s (totals: offline streams' frames)."""
    from maskstream.pipeline.bench.measure import measure
    from maskstream.pipeline.cli.progress import Progress, RunProgress
    from maskstream.pipeline.run_config import stream_ids
    from maskstream.pipeline.runtime.metrics import MetricsBoard

    live = set(stream_ids(cfg.sources)) if cfg.source.policy == "live" else set()
    board = MetricsBoard()
    with Progress(enabled=not args.quiet, every_s=args.progress_every) as progress:
        return measure(cfg, on_progress=RunProgress(progress, totals, live, board), board=board,
                       log_level=args.log_level, model=chosen)


def _live_run(cfg: RunConfig, args: argparse.Namespace, rate: float, chosen: ChosenModel | None) -> dict[str, Any]:
    from maskstream.pipeline.bench.measure import live_config, summarize

    frames = args.max_frames or max(2, math.ceil(rate * args.duration))
    return summarize(_measure(live_config(cfg, rate, args.streams, frames), args, chosen, {}), "live", rate)


def _model_description(cfg: RunConfig, chosen: ChosenModel | None) -> dict[str, Any]:
    from maskstream.pipeline.run_config import choose_model

    chosen = chosen or choose_model(cfg.model)
    model_cfg, checkpoint = chosen.config, chosen.checkpoint
    return {"name": cfg.model.name, "variant": model_cfg.variant,
            "config": str(cfg.model.config) if cfg.model.config else chosen.config_from,
            "checkpoint": str(checkpoint) if checkpoint else None, "engine": str(cfg.model.engine or "") or None,
            "trained": checkpoint is not None or cfg.model.engine is not None,
            "input": [model_cfg.static.batch, 3, model_cfg.static.height, model_cfg.static.width],
            "detections": model_cfg.static.detections, "device": cfg.model.device,
            "precision": cfg.model.precision or (None if cfg.model.engine else "fp32"),
            "overrides": list(cfg.model.overrides)}


def _s(stats: dict[str, float] | None, key: str) -> str:
    return "-" if not stats else f"{stats[key]:.2f} s"
