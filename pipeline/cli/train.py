"""`maskstream train`, `maskstream eval` and `maskstream synthetic`: argument parsing, config
loading and the progress display around model.train / model.evaluate / model.synthetic.

Only this module (and the rest of the CLI) prints; the library reports through records, which
the CLI's one progress implementation (pipeline.cli.progress, on tqdm) shows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from maskstream.model.config import ModelConfig
from maskstream.pipeline.cli import prepare_torch
from maskstream.pipeline.cli.options import add_logging, add_model_name, add_progress, config_file, subcommand
from maskstream.pipeline.cli.progress import Progress
from maskstream.pipeline.config import ConfigError, dump_config, load_config, loads_config

if TYPE_CHECKING:  # the handlers import these themselves: see cli/main.py
    from maskstream.model.datasets import Dataset
    from maskstream.model.evaluate import EvalReport
    from maskstream.model.mask_rcnn import MaskRCNN
    from maskstream.model.train import IterationRecord, TrainConfig

log = logging.getLogger("maskstream")

# --------------------------------------------------------------------------- progress


class TrainingProgress:
    """model.train's per-iteration records as one progress counter: iterations, rate and ETA,
    the losses, the learning rate and images/s (skipped samples when there are any)."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def __call__(self, r: IterationRecord) -> None:
        terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in r.losses.items())
        postfix = f"loss {r.total_loss:.3f} ({terms}), lr {r.lr:.4f}, {r.images_per_second:.1f} img/s"
        if r.skipped_samples:
            postfix += f", skipped {r.skipped_samples}"
        self.progress.set("train", r.iteration, r.max_iters, unit="iteration", postfix=postfix)


def progress_of(args: argparse.Namespace) -> Progress:
    return Progress(enabled=not args.quiet, every_s=args.progress_every)


# --------------------------------------------------------------------------- train


def load_model_config(path: Path, overrides: tuple[str, ...] | list[str]) -> ModelConfig:
    return load_config(ModelConfig, path, list(overrides))


def describe_dataset(name: str, data: Dataset) -> str:
    skips = data.describe_skips() if hasattr(data, "describe_skips") else ""
    return f"{name}: {len(data)} images, classes {', '.join(data.class_names[1:])}" + (f" ({skips})" if skips else "")


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    """--config with its inputs relative to the file, then --set and --data (relative to the working
    directory, as any path on a command line). A dataset read from files needs its path: the shipped
    real-data configs leave it to the command line."""
    from maskstream.model.train import TrainConfig, resolve_paths

    in_file = resolve_paths(load_config(TrainConfig, args.config), args.config.absolute().parent)
    cfg = loads_config(TrainConfig, dump_config(in_file), args.set, source=str(args.config))
    if args.data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, train=dataclasses.replace(cfg.data.train, path=args.data)))
    for name, spec in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if spec is not None and spec.format != "synthetic" and spec.path is None:
            flag = "--data PATH or " if name == "data.train" else ""
            raise ConfigError(f"{args.config}: {name} reads a {spec.format} dataset, and its path is not set: "
                              f"give it with {flag}--set {name}.path=PATH")
    return cfg


def start_from_named_model(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """--model NAME: its weights are the starting point (model.init) and its config the
    architecture (model.config, unless --set model.config=... chose one); the training config's
    model.overrides (classes, sizes) still apply, and the predictors start afresh when the
    number of classes differs."""
    from maskstream.model import zoo
    from maskstream.pipeline.run_config import ModelSelection, fetch_model

    weights = fetch_model(ModelSelection(name=args.model))
    named = zoo.named_model(args.model)
    config = cfg.model.config
    if named.config is not None and not any(item.split("=", 1)[0].strip() == "model.config" for item in args.set):
        config = named.config
    log.info("starting from model %s: %s (config %s)", args.model, weights, config)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=str(weights), config=config))


def train_command(args: argparse.Namespace) -> int:
    import torch
    from maskstream.model.datasets import open_dataset
    from maskstream.model.mask_rcnn import build
    from maskstream.model.train import check_classes, train
    from maskstream.pipeline.cli.files import refuse_existing

    prepare_torch()
    cfg = load_train_config(args)
    if args.model is not None:
        cfg = start_from_named_model(cfg, args)
    model_cfg = load_model_config(cfg.model.config, cfg.model.overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    if not args.resume:
        # a new run over an old one would mix their checkpoints and metrics
        refuse_existing([out / name for name in ("last.pt", "model_final.pt", "metrics.csv", "metrics.jsonl")],
                        args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (out / "model.yaml").write_text(dump_config(model_cfg), encoding="utf-8")

    train_data = open_dataset(cfg.data.train)
    log.info("%s", describe_dataset("train", train_data))
    val_data = open_dataset(cfg.data.val) if cfg.data.val is not None else None
    if val_data is not None:
        check_classes(model_cfg, val_data, "data.val")
        log.info("%s", describe_dataset("val", val_data))
    with progress_of(args) as progress:
        result = train(cfg, model_cfg, resume=args.resume, progress=TrainingProgress(progress), dataset=train_data)
    print(
        f"trained {result.iterations} iterations in {result.wall_seconds / 60:.1f} min wall, "
        f"{result.cpu_seconds / 60:.1f} min CPU; wrote {result.final_checkpoint}"
        + (f"; skipped {result.skipped_samples} unreadable samples" if result.skipped_samples else "")
    )
    summary = {
        "iterations": result.iterations,
        "wall_seconds": round(result.wall_seconds, 1),
        "cpu_seconds": round(result.cpu_seconds, 1),
        "last_losses": result.last_losses,
    }
    if val_data is not None:
        net = build(config=model_cfg, checkpoint=result.final_checkpoint)
        report = run_eval(net, val_data, class_agnostic=False, results_path=out / "val_results.json",
                          progress=progress_of(args))
        summary["val"] = report.metrics
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if args.build_engine:
        return build_engine_after_training(result.final_checkpoint, model_cfg, out / "model.engine")
    return 0


def build_engine_after_training(checkpoint: Path, model_cfg: ModelConfig, out: Path) -> int:
    from maskstream.model.engine import build_engine
    from maskstream.plugins.tensorrt_env import TensorRTUnavailable

    try:
        manifest = build_engine(checkpoint, model_cfg, out)
    except TensorRTUnavailable as exc:
        print(f"--build-engine: not built, TensorRT is not available here ({exc}); the checkpoint "
              f"{checkpoint} is ready for `maskstream build-engine` on a machine with it", file=sys.stderr)
        return 3
    print(f"wrote {out} ({manifest.precision}, input {list(manifest.input_shape)})")
    return 0


# --------------------------------------------------------------------------- eval


def run_eval(net: MaskRCNN, data: Dataset, class_agnostic: bool, results_path: Path,
             progress: Progress | None = None) -> EvalReport:
    from maskstream.model.evaluate import evaluate, metrics_table, write_results

    with progress or Progress(enabled=False) as shown:
        report = evaluate(net, data, class_agnostic=class_agnostic,
                          progress=lambda done, total: shown.set("eval", done, total, unit="image"))
    write_results(results_path, report.results)
    (results_path.with_name(results_path.stem + "_metrics.json")).write_text(
        json.dumps(report.metrics, indent=2), encoding="utf-8"
    )
    print(metrics_table(report.metrics))
    print(
        f"{report.images} images ({report.skipped_images} unreadable, skipped), {len(report.results)} detections, "
        f"{report.seconds:.1f} s; wrote {results_path}"
    )
    return report


def eval_command(args: argparse.Namespace) -> int:
    from maskstream.model.datasets import DatasetSpec, SyntheticSpec, open_dataset
    from maskstream.model.mask_rcnn import build
    from maskstream.model.train import pick_device
    from maskstream.pipeline.cli.files import new_run_dir, refuse_existing
    from maskstream.pipeline.run_config import ModelSelection, choose_model, fetch_model

    prepare_torch()
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        refuse_existing([out, out.with_name(out.stem + "_metrics.json")], args.overwrite)
    device = pick_device(args.device)
    selection = ModelSelection(name=args.model, config=args.config, checkpoint=args.checkpoint,
                               overrides=tuple(args.set))
    fetch_model(selection)
    chosen = choose_model(selection)
    log.info("model %s (config %s)", chosen.checkpoint, chosen.config_from)
    categories = tuple(c for c in args.categories.split(",") if c) if args.categories else ()
    if args.format == "synthetic":
        spec = DatasetSpec(format="synthetic", synthetic=SyntheticSpec(args.count, args.seed, args.size, args.size))
    else:
        if args.data is None:
            raise ValueError(f"--data is required for --format {args.format}")
        spec = DatasetSpec(
            format=args.format, path=args.data, images=args.images, split=args.split, categories=categories
        )
    data = open_dataset(spec)
    log.info("%s", describe_dataset("data", data))
    net = build(config=chosen.config, checkpoint=chosen.checkpoint).to(device)
    if out is None:  # a new run directory: made once nothing can refuse the evaluation
        out = new_run_dir(Path("runs"), "eval") / "eval_results.json"
    run_eval(net, data, args.class_agnostic, out, progress_of(args))
    return 0


# --------------------------------------------------------------------------- synthetic


def synthetic_command(args: argparse.Namespace) -> int:
    from maskstream.model.synthetic import write_synthetic_clip, write_synthetic_dataset

    start = time.perf_counter()
    out = Path(args.out)
    if args.count:
        ann = write_synthetic_dataset(out, args.count, args.seed, args.height, args.width)
        print(f"wrote {args.count} scenes: {out / 'images'}/, {ann}")
    if args.clip_frames:
        clip, ann = write_synthetic_clip(
            out / "clip.mp4", args.clip_frames, seed=args.seed, height=args.height, width=args.width, fps=args.fps
        )
        print(f"wrote {clip} ({args.clip_frames} frames, {args.fps} fps) and its ground truth {ann}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------- parsers


TRAIN_EXAMPLES = """
  maskstream train --config configs/train/synthetic_lite.yaml          # the bundled model's recipe
  maskstream train --config configs/train/coco128_person_car_lite.yaml --model maskrcnn_resnet50_fpn_coco
  maskstream train --config configs/train/synthetic_lite.yaml --resume # continue from output_dir/last.pt
"""
EVAL_EXAMPLES = """
  maskstream eval --format synthetic --count 20                        # the bundled model on new synthetic scenes
  maskstream eval --model maskrcnn_resnet50_fpn_coco --data instances.json --images imgs/
  maskstream eval --checkpoint runs/x/model_final.pt --format davis --data DAVIS --class-agnostic
"""
SYNTHETIC_EXAMPLES = """
  maskstream synthetic --out data/ --count 200 --clip-frames 100
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tr = subcommand(sub, "train", "train Mask R-CNN from a configs/train/*.yaml file", TRAIN_EXAMPLES)
    tr.add_argument("--config", type=config_file, required=True, help="training YAML (mirrors model.train.TrainConfig)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    add_model_name(tr, "the starting point (its weights and architecture; the config's model.overrides still "
                       "apply)")
    tr.add_argument("--data", type=Path, help="the training dataset (data.train.path; the real-data configs need it)")
    tr.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt")
    tr.add_argument("--overwrite", action="store_true", help="start afresh over an earlier run in output_dir")
    tr.add_argument("--build-engine", action="store_true", help="end with a TensorRT engine build (needs TensorRT)")
    add_progress(tr)
    add_logging(tr)
    tr.set_defaults(func=train_command)

    ev = subcommand(sub, "eval", "COCO bbox + segm AP of a checkpoint on a dataset (pycocotools)", EVAL_EXAMPLES)
    add_model_name(ev, "the model to evaluate")
    ev.add_argument("--checkpoint", type=Path, help="model weights (default: the bundled model)")
    ev.add_argument("--config", type=config_file,
                    help="model YAML (default: the named model's, else model.yaml beside the checkpoint, else read "
                         "from the checkpoint's keys)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model config value (repeatable)")
    ev.add_argument("--data", type=Path, help="COCO JSON, or the dataset root for the other formats")
    ev.add_argument("--format", choices=["coco", "yolo_seg", "instance_png", "davis", "synthetic"], default="coco",
                    help="the dataset's format")
    ev.add_argument("--images", type=Path, help="coco: the image folder (default: the JSON's folder)")
    ev.add_argument("--split", default="train2017", help="yolo_seg: images/<split>, labels/<split>")
    ev.add_argument("--categories", help="comma-separated category names to keep (e.g. person,car; default: all)")
    ev.add_argument("--class-agnostic", action="store_true", help="match detections to objects of any class")
    ev.add_argument("--count", type=int, default=100, help="synthetic: number of scenes")
    ev.add_argument("--seed", type=int, default=1_000_000, help="synthetic: first seed (training uses 0..)")
    ev.add_argument("--size", type=int, default=320, help="synthetic: scene height and width")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    ev.add_argument("--out", help="COCO results JSON; the metrics go beside it (default: a new "
                                  "runs/eval-N/eval_results.json)")
    ev.add_argument("--overwrite", action="store_true", help="replace the results of an earlier eval at --out")
    add_progress(ev)
    add_logging(ev)
    ev.set_defaults(func=eval_command)

    syn = subcommand(sub, "synthetic", "write synthetic scenes as a COCO dataset and/or a video clip",
                     SYNTHETIC_EXAMPLES)
    syn.add_argument("--out", required=True, help="folder: images/, annotations.json, clip.mp4, clip_annotations.json")
    syn.add_argument("--count", type=int, default=100, help="scenes (0: none)")
    syn.add_argument("--seed", type=int, default=0, help="seed of the first scene")
    syn.add_argument("--height", type=int, default=320, help="scene height in pixels")
    syn.add_argument("--width", type=int, default=320, help="scene width in pixels")
    syn.add_argument("--clip-frames", type=int, default=0, help="also write a clip of this many frames")
    syn.add_argument("--fps", type=int, default=25, help="the clip's frame rate")
    add_logging(syn)
    syn.set_defaults(func=synthetic_command)
