"""`maskstream run`: the streaming pipeline over one or more sources.

Without --source it runs a generated sample clip (pipeline.run_config.write_sample_clip) with
the default model; without any output named (--out, --coco, --annotate, --publish) it writes
results.jsonl, coco_results.json and, for video files, annotated.mp4 into --out-dir.

Part of the CLI, so it prints (a progress bar for offline sources on stderr, a throughput
summary at the end) and chooses the exit status: 0 all streams finished; 1 a source failed
(the others and the results already written are kept; the summary names it); 3 a stage kept
failing; 130 interrupted (after a clean drain of the offline streams).

Settings: configs/pipeline.yaml (pipeline.run_config.RunConfig) and `--set key=value`; a key
under model. that is not a ModelSelection field overrides the model config
(`--set model.roi_heads.score_thresh=0.0`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskstream.configs import CONFIG_DIR
from maskstream.pipeline.config import ConfigError, load_config

if TYPE_CHECKING:  # the handlers import these themselves: see cli/main.py
    from maskstream.pipeline.run_config import ModelSelection, RunConfig
    from maskstream.pipeline.runtime.supervisor import RunReport, SteadyRate, Supervisor


def add_parsers(subparsers: Any) -> None:
    """Add `run` to the CLI's subparsers."""
    p = subparsers.add_parser("run", help="run the streaming pipeline over video files, RTSP/HTTP streams or devices")
    p.add_argument("--source", action="append", default=[], metavar="URL",
                   help="a video file, rtsp://, http(s):// URL or /dev/video*; repeat for several streams")
    p.add_argument("--config", type=Path, default=CONFIG_DIR / "pipeline.yaml", help="pipeline YAML (RunConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--out", type=Path, help="JSONL of detections per frame")
    p.add_argument("--coco", type=Path, help="COCO results JSON")
    p.add_argument("--annotate", type=Path, help="annotated video (file sources only)")
    p.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    p.add_argument("--workers", type=int, help="preprocess and postprocess processes (each)")
    p.add_argument("--policy", choices=["auto", "offline", "live"], help="override every source's policy")
    add_model_selection(p)
    p.add_argument("--out-dir", type=Path, default=Path("out"),
                   help="where the sample clip (no --source) and the default outputs (none named) go")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_model_selection(p: argparse.ArgumentParser) -> None:
    """The model options `run` and `bench` share (config keys model.*)."""
    p.add_argument("--model-config", type=Path, help="model YAML (default: the bundled model, else lite)")
    p.add_argument("--checkpoint", type=Path, help="model weights")
    p.add_argument("--engine", type=Path, help="TensorRT engine (with its manifest beside it)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where the torch runner runs (default auto: CUDA when there is a device)")
    p.add_argument("--precision", choices=["fp32", "fp16"],
                   help="torch runner: fp16 runs the backbone + FPN and mask head in float16 (default fp32); "
                        "with --engine, the precision it must have been built with")


def run_config(args: argparse.Namespace) -> RunConfig:
    from maskstream.pipeline.run_config import ModelSelection, RunConfig

    selection_fields = {f.name for f in dataclasses.fields(ModelSelection)}
    pipeline_sets, model_sets = [], []
    for item in args.set:
        key = item.partition("=")[0].strip()
        parts = key.split(".")
        if parts[0] == "model" and len(parts) > 1 and parts[1] not in selection_fields:
            model_sets.append(item.split(".", 1)[1])
        else:
            pipeline_sets.append(item)
    flags = {
        "sources": args.source or None, "workers": args.workers,
        "source.policy": args.policy, "outputs.jsonl": args.out, "outputs.coco": args.coco,
        "outputs.annotate": args.annotate, "outputs.publish": args.publish, "outputs.metrics_port": args.metrics_port,
        "model.config": args.model_config, "model.checkpoint": args.checkpoint, "model.engine": args.engine,
        "model.device": args.device, "model.precision": args.precision,
    }
    cfg = load_config(RunConfig, args.config, pipeline_sets)
    for key, value in flags.items():
        if value is not None:
            cfg = _replace(cfg, key.split("."), tuple(value) if isinstance(value, list) else value)
    if model_sets:
        cfg = _replace(cfg, ["model", "overrides"], (*cfg.model.overrides, *model_sets))
    return cfg


def _replace(obj: Any, keys: list[str], value: Any) -> Any:
    if len(keys) == 1:
        return dataclasses.replace(obj, **{keys[0]: value})
    return dataclasses.replace(obj, **{keys[0]: _replace(getattr(obj, keys[0]), keys[1:], value)})


def run(args: argparse.Namespace) -> int:
    from maskstream.pipeline.run_config import default_outputs, has_outputs, plan, write_sample_clip
    from maskstream.pipeline.runtime.metrics import MetricsBoard, MetricsServer
    from maskstream.pipeline.runtime.supervisor import SteadyRate, Supervisor

    try:
        cfg = run_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sample_truth: Path | None = None  # the generated clip's ground truth, to score the run against
    if not cfg.sources:
        try:
            clip = write_sample_clip(args.out_dir)
            sample_truth = clip.with_name(f"{clip.stem}_annotations.json")
        except OSError as exc:
            print(f"error: cannot write the sample clip into {args.out_dir}: {exc}", file=sys.stderr)
            return 2
        print(f"note: no --source given: running the generated sample clip {clip}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, sources=(str(clip),))
    if not has_outputs(cfg.outputs):
        cfg = default_outputs(cfg, args.out_dir)
    _model_note(cfg.model)
    the_plan = plan(cfg)
    totals = {sid: _frame_count(spec.url) if spec.policy == "offline" else None
              for sid, spec in the_plan.source_specs.items()}
    board = MetricsBoard()
    server = MetricsServer(cfg.outputs.metrics_port, board.render).start() if cfg.outputs.metrics_port else None
    bar = _ProgressBar(totals, enabled=not args.quiet and sys.stderr.isatty() and any(totals.values()))
    rate = SteadyRate()

    def watch(supervisor: Supervisor) -> None:
        bar.update(supervisor)
        rate.update(supervisor)

    try:
        report = Supervisor(the_plan.specs, the_plan.reports, the_plan.streams, cfg.supervisor, board).run(watch)
    finally:
        bar.close()
        if server is not None:
            server.close()
        the_plan.close()
    code = _summary(report, the_plan.source_specs, rate)
    annotated = [o.annotate for spec in the_plan.specs if spec.name == "publish.0" for o in spec.config.streams]
    written = [p for p in (cfg.outputs.jsonl, cfg.outputs.coco, *annotated) if p is not None and p.exists()]
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    if sample_truth is not None and cfg.outputs.coco is not None and cfg.outputs.coco.is_file() and code == 0:
        print(_sample_score(sample_truth, cfg.outputs.coco))
    return code


def _sample_score(truth: Path, results: Path) -> str:
    """COCO AP of the run's results on the generated clip, whose ground truth is exact."""
    from maskstream.model.evaluate import coco_metrics  # pycocotools: only this check needs it here

    metrics, _ = coco_metrics(json.loads(truth.read_text()), json.loads(results.read_text()))
    return (f"against the sample clip's ground truth ({truth.name}): bbox AP {metrics['bbox']['AP']:.3f}, "
            f"segm AP {metrics['segm']['AP']:.3f} (AP50 {metrics['segm']['AP50']:.3f})")


def _model_note(selection: ModelSelection) -> None:
    from maskstream.pipeline.run_config import default_model

    if selection.engine is not None:
        return
    if selection.config is None and selection.checkpoint is None:
        config, checkpoint = default_model()
        if checkpoint is not None:
            print(f"note: using the bundled model {checkpoint.name} ({config.name}), trained on the built-in "
                  "synthetic shapes", file=sys.stderr)
            return
    elif selection.checkpoint is not None:
        return
    print("note: no trained model (no --checkpoint, no bundled weights yet): the detection heads are untrained "
          "and the detections are not meaningful", file=sys.stderr)


def _frame_count(url: str) -> int | None:
    from maskstream.pipeline.media.video import VideoError, probe

    try:
        return probe(url).frames or None
    except (VideoError, OSError, ValueError):
        return None  # the decode stage reports a bad file, with the other streams going on


class _ProgressBar:
    def __init__(self, totals: dict[str, int | None], enabled: bool):
        self.totals, self.enabled, self.drawn = totals, enabled, False
        self.next_draw = 0.0

    def update(self, supervisor: Supervisor) -> None:
        now = time.monotonic()
        if not self.enabled or now < self.next_draw:
            return
        self.next_draw = now + 0.25
        progress = supervisor.publish_progress()
        done = sum(p.next_seq for sid, p in progress.items() if self.totals.get(sid))
        total = sum(t for t in self.totals.values() if t)
        width = 30
        filled = int(width * min(done, total) / max(total, 1))
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} frames", end="", file=sys.stderr)
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            print(file=sys.stderr)


def _summary(report: RunReport, sources: dict[str, Any], rate: SteadyRate) -> int:
    frames = sum(s.frames for s in report.streams)
    print(f"{frames} frames in {report.elapsed_s:.1f} s: {frames / max(report.elapsed_s, 1e-9):.2f} frames/s "
          f"over {len(report.streams)} stream(s){rate.describe()}")
    for s in report.streams:
        state = "ok" if s.ended and not s.error else f"FAILED: {s.error}"
        print(f"  {s.stream_id} ({sources[s.stream_id].url}): {s.frames} frames, {s.lost} lost/dropped, {state}")
    for name, count in report.restarts:
        print(f"  stage {name} restarted {count} time(s)")
    if report.malformed:
        print(f"  {report.malformed} malformed message(s) ignored")
    for error in report.stage_errors:
        print(f"  last error: {error}", file=sys.stderr)
    if report.failure:
        print(f"error: {report.failure}", file=sys.stderr)
        return 3
    if report.interrupted:
        return 130
    return 1 if report.failed_streams else 0
