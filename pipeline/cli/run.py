"""`maskstream run`: the streaming pipeline over one or more sources.

Without --source it runs a generated sample clip (pipeline.run_config.write_sample_clip) with
the default model; without any output named (--out, --coco, --annotate, --publish) it writes
results.jsonl, coco_results.json and, for video files, annotated.mp4 into a new run directory
(runs/run-N; --out-dir names another). An output file that exists already is refused unless
--overwrite.

Before anything heavy (torch, the model, the stage processes) every source is probed, the device
checked and the model's checkpoint matched against its config, so a typo costs a second, not a
model load, and is reported once. A live camera that cannot be reached is no reason to refuse:
the run starts and keeps retrying it, and says so.

Part of the CLI, so it prints (the stream ids and model at start, progress on stderr, a
throughput summary at the end) and chooses the exit status: 0 all streams finished; 1 a source
failed during the run (the others and the results already written are kept; the summary names
it); 2 refused at start (bad source, option, model or existing output); 3 a stage kept failing;
130 interrupted (after a clean drain of the offline streams).

Before it plans the run, it removes what runs killed without a chance to clean up left on the
machine (shared-memory rings, socket folders: pipeline.run_config.remove_dead_runs), and says so.

Settings: configs/pipeline.yaml (pipeline.run_config.RunConfig) and `--set key=value`; a key
under model. that is not a ModelSelection field overrides the model config
(`--set model.roi_heads.score_thresh=0.0`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskstream.configs import CONFIG_DIR
from maskstream.pipeline.cli.files import new_run_dir, refuse_existing
from maskstream.pipeline.cli.options import add_logging, add_model_name, add_progress, config_file, subcommand
from maskstream.pipeline.config import ConfigError, load_config

if TYPE_CHECKING:  # the handlers import these themselves: see cli/main.py
    from maskstream.pipeline.media.sources import Probe, SourceSpec
    from maskstream.pipeline.run_config import ChosenModel, ModelSelection, RunConfig
    from maskstream.pipeline.runtime.supervisor import RunReport, SteadyRate, StreamResult

log = logging.getLogger("maskstream.run")

RUNS_DIR = Path("runs")
PROBE_TIMEOUT_S = 5.0

EXAMPLES = """
  maskstream run                                            # the sample clip, bundled model, into runs/run-N
  maskstream run --source street.mp4 --model maskrcnn_resnet50_fpn_coco
  maskstream run --source street.mp4 --out r.jsonl --annotate r.mp4 --max-frames 100
  maskstream run --source cam0=rtsp://10.0.0.5/stream --publish tcp://127.0.0.1:5556
  maskstream run --source a.mp4 --checkpoint runs/train/model_final.pt --device cuda
"""


def add_parsers(subparsers: Any) -> None:
    """Add `run` to the CLI's subparsers."""
    p = subcommand(subparsers, "run", "run the streaming pipeline over video files, RTSP/HTTP streams or devices",
                   EXAMPLES)
    p.add_argument("--source", action="append", default=[], metavar="[NAME=]URL",
                   help="a video file, rtsp://, http(s):// URL or /dev/video*, optionally named (cam0=rtsp://...: "
                        "stream id cam0); repeat for several streams. Unnamed: file stem, or URL host and path "
                        "(see README 'Stream ids'); default: a generated sample clip")
    p.add_argument("--config", type=config_file, default=CONFIG_DIR / "pipeline.yaml", help="pipeline YAML (RunConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. source.max_frames=100 (repeatable)")
    p.add_argument("--out", type=Path, help="JSONL of detections per frame")
    p.add_argument("--coco", type=Path, help="COCO results JSON")
    p.add_argument("--annotate", type=Path, help="annotated video (file sources only)")
    p.add_argument("--publish", metavar="ENDPOINT", help="ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--publish-key", type=Path, metavar="FILE",
                   help="CurveZMQ: the publisher's secret key file (NAME.key_secret); encrypts the published "
                        "results and lets in only the subscribers of --publish-clients")
    p.add_argument("--publish-clients", type=Path, metavar="DIR",
                   help="CurveZMQ: folder of the public key files (*.key) of the subscribers let in")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    p.add_argument("--workers", type=int, help="preprocess and postprocess processes, each (default: config's, 1)")
    p.add_argument("--max-frames", type=int, metavar="N",
                   help="end every source after N frames (source.max_frames; default: all)")
    p.add_argument("--policy", choices=["auto", "offline", "live"],
                   help="override every source's policy (default auto: files offline, cameras live)")
    add_model_selection(p)
    p.add_argument("--out-dir", type=Path,
                   help="where the sample clip (no --source) and the default outputs (none named) go "
                        f"(default: a new {RUNS_DIR}/run-N)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    add_progress(p)
    add_logging(p)
    p.set_defaults(func=run)


def add_model_selection(p: argparse.ArgumentParser) -> None:
    """The model options `run` and `bench` share (config keys model.*, source.decode, infer.preprocess,
    infer.masks)."""
    add_model_name(p)
    p.add_argument("--model-config", type=config_file,
                   help="model YAML (default: the named model's, else model.yaml beside --checkpoint, else read "
                        "from the checkpoint's keys)")
    p.add_argument("--checkpoint", type=Path, help="model weights: ours or torchvision's Mask R-CNN (v1, v2, lite)")
    p.add_argument("--engine", type=Path, help="TensorRT engine (with its manifest beside it)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where the torch runner runs (default auto: CUDA when there is a device)")
    p.add_argument("--precision", choices=["fp32", "fp16"],
                   help="torch runner: fp16 runs the backbone + FPN and mask head in float16 (default fp32); "
                        "with --engine, the precision it must have been built with")
    p.add_argument("--decode", choices=["auto", "cpu", "nvdec"],
                   help="video decoder (source.decode): auto (default) NVDEC when FFmpeg can open a CUDA device, "
                        "else the CPU, saying why; nvdec: an error where it cannot")
    p.add_argument("--preprocess", choices=["auto", "stage", "infer"],
                   help="where frames become the model's input (infer.preprocess): stage, CPU processes; infer, "
                        "the inference process on the runner's device; auto (default): infer with torch on CUDA")
    p.add_argument("--masks", choices=["auto", "probs", "crops"],
                   help="what the inference process sends of each mask (infer.masks): probs (default), its 28x28 "
                        "probabilities, pasted by postprocess; crops, pasted and thresholded on the runner's "
                        "device, its binary crop; auto: crops with torch on CUDA")


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
        "source.policy": args.policy, "source.max_frames": args.max_frames,
        "outputs.jsonl": args.out, "outputs.coco": args.coco,
        "outputs.annotate": args.annotate, "outputs.publish": args.publish, "outputs.metrics_port": args.metrics_port,
        "model.name": args.model, "model.config": args.model_config, "model.checkpoint": args.checkpoint,
        "model.engine": args.engine, "model.device": args.device, "model.precision": args.precision,
        "source.decode": getattr(args, "decode", None), "infer.preprocess": getattr(args, "preprocess", None),
        "infer.masks": getattr(args, "masks", None),
        # bench (which shares this function) has no CurveZMQ options
        "outputs.publish_key": getattr(args, "publish_key", None),
        "outputs.publish_clients": getattr(args, "publish_clients", None),
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


class Refused(Exception):
    """The run cannot start; the message (one or more lines) says why. Printed once, exit 2."""


def run(args: argparse.Namespace) -> int:
    from maskstream.pipeline.cli.progress import Progress, RunProgress
    from maskstream.pipeline.run_config import default_outputs, has_outputs, source_specs, write_sample_clip
    from maskstream.pipeline.runtime.metrics import MetricsBoard, MetricsServer
    from maskstream.pipeline.runtime.supervisor import SteadyRate, Supervisor

    try:
        cfg = run_config(args)
        check_device(cfg.model)
        check_model_name(cfg.model)  # both before the sample clip: a refused run leaves no run directory
        sample_truth: Path | None = None  # the generated clip's ground truth, to score the run against
        out_dir = args.out_dir
        if not cfg.sources:
            out_dir = _out_dir(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            clip = write_sample_clip(out_dir)
            sample_truth = clip.with_name(f"{clip.stem}_annotations.json")
            log.info("no --source given: running the generated sample clip %s", clip)
            cfg = dataclasses.replace(cfg, sources=(str(clip),))
        specs = source_specs(cfg)  # ValueError: two sources with one name
        probes = probe_sources(specs)
        if not has_outputs(cfg.outputs) and out_dir is not None:
            cfg = default_outputs(cfg, _out_dir(out_dir))
        _refuse_existing_outputs(cfg, args.overwrite)
        chosen = load_model(cfg.model)
        if not has_outputs(cfg.outputs):  # a new run directory: made once nothing can refuse the run
            out_dir = _out_dir(None)
            cfg = default_outputs(cfg, out_dir)
    except Refused as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    if out_dir is not None:
        log.info("run directory: %s", out_dir)
    _describe_streams(specs, probes)
    from maskstream.pipeline.run_config import plan, remove_dead_runs

    leftovers = remove_dead_runs(cfg.transport.endpoint_dir)
    if leftovers:
        log.info("removed %s", leftovers.describe())
    try:
        the_plan = plan(cfg, args.log_level, chosen)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # whatever happens from here, a run that ends leaves no ring and no socket folder behind
        _exposure_warning(cfg)  # after plan: its keys are checked
        board = MetricsBoard()
        server = MetricsServer(cfg.outputs.metrics_port, board.render).start() if cfg.outputs.metrics_port else None
        totals = {sid: probe.frames for sid, probe in probes.items()}
        live = {sid for sid, probe in probes.items() if probe.policy == "live"}
        progress = Progress(enabled=not args.quiet, every_s=args.progress_every)
        watcher = RunProgress(progress, totals, live, board)
        rate = SteadyRate()

        def watch(supervisor: Supervisor) -> None:
            watcher(supervisor)
            rate.update(supervisor)

        supervisor = Supervisor(the_plan.specs, the_plan.reports, the_plan.streams, cfg.supervisor, board)
        try:
            with _redirect_logging(progress):
                report = supervisor.run(watch)
            watcher(supervisor, force=True)  # where every stream ended
        finally:
            progress.close()
            if server is not None:
                server.close()
    finally:
        the_plan.close()
    code = _summary(report, the_plan.source_specs, rate)
    from maskstream.pipeline.run_config import output_files

    written = [p for p in output_files(cfg) if p.exists()]
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    if sample_truth is not None and cfg.outputs.coco is not None and cfg.outputs.coco.is_file() and code == 0:
        print(_sample_score(sample_truth, cfg.outputs.coco))
    return code


def _out_dir(given: Path | None) -> Path:
    """--out-dir as given (the output writers make it), else a new run directory, made now."""
    return given if given is not None else new_run_dir(RUNS_DIR, "run")


def probe_sources(specs: dict[str, SourceSpec], option: str = "--source") -> dict[str, Probe]:
    """Every source opened once, side by side (a camera's timeout does not add to the next one's);
    Refused listing every source that cannot work (each line starting with `option`, what the user
    gave it as); a live one out of reach now is only logged."""
    from maskstream.pipeline.media.sources import SourceError, probe_source

    def one(spec: SourceSpec) -> Probe | str:
        try:
            return probe_source(spec, PROBE_TIMEOUT_S)
        except SourceError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:
        found = dict(zip(specs, pool.map(one, specs.values())))
    bad = [f"{option} {result}" for result in found.values() if isinstance(result, str)]
    if bad:
        raise Refused("\n".join(bad))
    probes = {sid: result for sid, result in found.items() if not isinstance(result, str)}
    for sid, probe in probes.items():
        if probe.problem:
            spec = specs[sid]
            tries = "forever" if spec.max_reconnects is None else f"up to {spec.max_reconnects} times in a row"
            log.warning("%s (%s): not reachable now (%s); the run starts anyway and will retry it, %s, with "
                        "backoff %g..%g s", sid, spec.url, probe.problem, tries, *spec.reconnect_backoff_s)
    return probes


def check_model_name(selection: ModelSelection) -> None:
    """Refused when --model names no model of the catalogue (a cheap look-up: nothing fetched)."""
    from maskstream.pipeline.run_config import check_selection

    try:
        check_selection(selection)
    except ValueError as exc:
        raise Refused(str(exc)) from None


def check_device(selection: ModelSelection) -> None:
    """Refused when the torch runner is asked for CUDA on a machine without it."""
    if selection.device != "cuda" or selection.engine is not None:
        return
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}, but no device is visible"
                                                  if torch.version.cuda else "a CPU-only build")
        raise Refused(f"--device cuda: no CUDA device here ({build}); use --device cpu or auto, or see the README's "
                      "'GPU quick start'")


def _refuse_existing_outputs(cfg: RunConfig, overwrite: bool) -> None:
    from maskstream.pipeline.cli.files import OutputExists
    from maskstream.pipeline.run_config import output_files

    try:
        replaced = refuse_existing(output_files(cfg), overwrite)
    except OutputExists as exc:
        raise Refused(str(exc)) from None
    for path in replaced:
        log.info("--overwrite: removed %s", path)


def load_model(selection: ModelSelection) -> ChosenModel:
    """The model the run will load, fetched if named and checked against its config (with an
    engine: its manifest against what was asked). Refused with one message otherwise."""
    from maskstream.model.zoo import DownloadError
    from maskstream.pipeline.run_config import check_model, choose_model, fetch_model, inference_contract

    try:
        fetch_model(selection)
        chosen = choose_model(selection)
        if selection.engine is not None:
            inference_contract(selection, chosen.config)  # EngineMismatch / ContractMismatch: ValueErrors
            log.info("engine %s", selection.engine)
            return chosen
        check_model(chosen)
    except (DownloadError, ConfigError, ValueError) as exc:  # CheckpointError is a ValueError
        raise Refused(str(exc)) from None
    what = f"model {selection.name}" if selection.name else "model"
    if chosen.checkpoint is None:
        log.warning("%s: untrained detection heads (no checkpoint, no bundled weights): the detections are "
                    "not meaningful", what)
    elif selection.name is None and selection.checkpoint is None and selection.config is None:
        log.info("using the bundled model %s (config %s), trained on the built-in synthetic shapes only; for real "
                 "video use --model maskrcnn_resnet50_fpn_coco (COCO's 80 classes)", chosen.checkpoint,
                 chosen.config_from)
    else:
        log.info("%s: %s (config %s)", what, chosen.checkpoint, chosen.config_from)
    return chosen


def _describe_streams(specs: dict[str, SourceSpec], probes: dict[str, Probe]) -> None:
    for sid, spec in specs.items():
        probe = probes[sid]
        if probe.policy == "live":
            what = "live"
        elif probe.frames is None:
            what = "offline, frame count unknown"
        else:
            what = f"offline, {'' if probe.exact else '~'}{probe.frames} frames"
        size = f", {probe.info.width}x{probe.info.height}" if probe.info is not None else ""
        log.info("stream %s <- %s (%s%s)", sid, spec.url, what, size)


class _redirect_logging:
    """Log lines printed above the progress bars instead of through them (on a terminal)."""

    def __init__(self, progress: Any) -> None:
        self.tty = progress.enabled and progress.tty
        self._context: Any = None

    def __enter__(self) -> None:
        if self.tty:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._context = logging_redirect_tqdm()
            self._context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)


def _exposure_warning(cfg: RunConfig) -> None:
    """A publish endpoint other hosts can reach is a decision: say so, naming the address."""
    from maskstream.pipeline.run_config import publish_exposure

    out = cfg.outputs
    where = publish_exposure(out.publish) if out.publish is not None else None
    if where is None:
        return
    if out.publish_key is not None:
        how = (f"encrypted with CurveZMQ, and only the subscribers whose public keys are in {out.publish_clients} "
               "are let in")
    else:
        how = ("unencrypted: anyone who can reach this host there reads every result (use tcp://127.0.0.1:PORT "
               "for this host only, or --publish-key and --publish-clients for CurveZMQ)")
    log.warning("--publish %s listens on %s, %s", out.publish, where, how)


def _sample_score(truth: Path, results: Path) -> str:
    """COCO AP of the run's results on the generated clip, whose ground truth is exact."""
    from maskstream.model.evaluate import coco_metrics  # pycocotools: only this check needs it here

    metrics, _ = coco_metrics(json.loads(truth.read_text()), json.loads(results.read_text()))
    return (f"against the sample clip's ground truth ({truth.name}): bbox AP {metrics['bbox']['AP']:.3f}, "
            f"segm AP {metrics['segm']['AP']:.3f} (AP50 {metrics['segm']['AP50']:.3f})")


def _stream_state(stream: StreamResult, interrupted: bool) -> str:
    from maskstream.pipeline.runtime.supervisor import UNFINISHED
    from maskstream.pipeline.stages.decode import INTERRUPTED

    if stream.ended and not stream.error:
        return "ok"
    # Stopped by the user (Ctrl-C, SIGTERM) where it was, or before its end reached the outputs: no failure.
    if interrupted and (stream.error == INTERRUPTED or (not stream.ended and stream.error == UNFINISHED)):
        return "stopped (interrupted)" if stream.ended else "stopped (interrupted; its end was not published)"
    return f"FAILED: {stream.error}"


def _summary(report: RunReport, sources: dict[str, Any], rate: SteadyRate) -> int:
    frames = sum(s.frames for s in report.streams)
    print(f"{frames} frames in {report.elapsed_s:.1f} s: {frames / max(report.elapsed_s, 1e-9):.2f} frames/s "
          f"over {len(report.streams)} stream(s){rate.describe()}")
    for s in report.streams:
        print(f"  {s.stream_id} ({sources[s.stream_id].url}): {s.frames} frames, {s.lost} lost/dropped, "
              f"{_stream_state(s, report.interrupted)}")
    for name, count in report.restarts:
        print(f"  stage {name} restarted {count} time(s)")
    for s in report.streams:
        if s.rewinds:  # docs/delivery.md
            print(f"  stream {s.stream_id} rewound {s.rewinds} time(s) to send lost frames again")
    if report.malformed:
        print(f"  {report.malformed} malformed message(s) ignored")
    # A stage's last error is shown unless it is the failure itself, which follows.
    for error in report.stage_errors:
        if error not in report.failure:
            print(f"  last error: {error}", file=sys.stderr)
    if report.failure:
        print(f"error: {report.failure}", file=sys.stderr)
        return 3
    if report.interrupted:
        return 130
    return 1 if report.failed_streams else 0
