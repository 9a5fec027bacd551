"""`maskstream train`, `maskstream eval` and `maskstream synthetic`: argument parsing, config
loading and the progress display around model.train / model.evaluate / model.synthetic.

Only this module (and the rest of the CLI) prints; the library reports through records.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from maskstream.model.bundled import BUNDLED_CHECKPOINT, BUNDLED_CONFIG
from maskstream.model.config import ModelConfig
from maskstream.pipeline.cli import prepare_torch
from maskstream.pipeline.config import ConfigError, dump_config, load_config, loads_config

if TYPE_CHECKING:  # the handlers import these themselves: see cli/main.py
    from maskstream.model.datasets import Dataset
    from maskstream.model.evaluate import EvalReport
    from maskstream.model.mask_rcnn import MaskRCNN
    from maskstream.model.train import IterationRecord, TrainConfig

# --------------------------------------------------------------------------- progress


class ProgressBar:
    """One line per iteration on a terminal (redrawn in place), every `every` iterations in a log file."""

    def __init__(self, stream=sys.stderr, every: int = 20, width: int = 24):
        self.stream, self.every, self.width = stream, every, width
        self.tty = stream.isatty()
        self.smoothed: float | None = None

    def __call__(self, r: IterationRecord) -> None:
        # An exponential average: per-iteration times jump with the number of objects per image.
        self.smoothed = r.seconds if self.smoothed is None else 0.9 * self.smoothed + 0.1 * r.seconds
        if not self.tty and r.iteration % self.every and r.iteration != r.max_iters:
            return
        filled = round(self.width * r.iteration / r.max_iters)
        eta = self.smoothed * (r.max_iters - r.iteration)
        terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in r.losses.items())
        line = (
            f"{r.iteration:>6}/{r.max_iters} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"loss {r.total_loss:.3f} ({terms}) lr {r.lr:.4f} {self.smoothed:.2f} s/it "
            f"{r.images_per_second:.1f} img/s eta {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        if r.skipped_samples:
            line += f" skipped {r.skipped_samples}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if r.iteration == r.max_iters else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def eval_progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\revaluating {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()


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


def train_command(args: argparse.Namespace) -> int:
    import torch
    from maskstream.model.datasets import open_dataset
    from maskstream.model.mask_rcnn import build
    from maskstream.model.train import check_classes, train

    prepare_torch()
    cfg = load_train_config(args)
    model_cfg = load_model_config(cfg.model.config, cfg.model.overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (out / "model.yaml").write_text(dump_config(model_cfg), encoding="utf-8")

    train_data = open_dataset(cfg.data.train)
    print(describe_dataset("train", train_data), file=sys.stderr)
    val_data = open_dataset(cfg.data.val) if cfg.data.val is not None else None
    if val_data is not None:
        check_classes(model_cfg, val_data, "data.val")
        print(describe_dataset("val", val_data), file=sys.stderr)
    result = train(cfg, model_cfg, resume=args.resume, progress=ProgressBar(), dataset=train_data)
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
        report = run_eval(net, val_data, class_agnostic=False, results_path=out / "val_results.json")
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


def run_eval(net: MaskRCNN, data: Dataset, class_agnostic: bool, results_path: Path) -> EvalReport:
    from maskstream.model.evaluate import evaluate, metrics_table, write_results

    report = evaluate(net, data, class_agnostic=class_agnostic, progress=eval_progress)
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


def eval_model_config(args: argparse.Namespace) -> Path:
    """--config, else model.yaml beside the checkpoint (written by `train`), else the bundled model's."""
    if args.config is not None:
        return args.config
    beside = args.checkpoint.parent / "model.yaml"
    if beside.is_file():
        return beside
    if args.checkpoint.resolve() == BUNDLED_CHECKPOINT.resolve():
        return BUNDLED_CONFIG
    raise FileNotFoundError(
        f"--checkpoint {args.checkpoint}: no model.yaml beside it; name its model config with --config"
    )


def eval_command(args: argparse.Namespace) -> int:
    from maskstream.model.datasets import DatasetSpec, SyntheticSpec, open_dataset
    from maskstream.model.mask_rcnn import build
    from maskstream.model.train import pick_device

    prepare_torch()
    if args.checkpoint is None:
        args.checkpoint = BUNDLED_CHECKPOINT
    model_cfg = load_model_config(eval_model_config(args), args.set)
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
    print(describe_dataset("data", data), file=sys.stderr)
    net = build(config=model_cfg, checkpoint=args.checkpoint).to(pick_device(args.device))
    run_eval(net, data, args.class_agnostic, Path(args.out))
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train Mask R-CNN from a configs/train/*.yaml file")
    tr.add_argument("--config", type=Path, required=True, help="training YAML (mirrors model.train.TrainConfig)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    tr.add_argument("--data", type=Path, help="the training dataset (data.train.path; the real-data configs need it)")
    tr.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt")
    tr.add_argument("--build-engine", action="store_true", help="end with a TensorRT engine build (needs TensorRT)")
    tr.set_defaults(func=train_command)

    ev = sub.add_parser("eval", help="COCO bbox + segm AP of a checkpoint on a dataset (pycocotools)")
    ev.add_argument("--checkpoint", type=Path, help="model weights (default: the bundled model)")
    ev.add_argument("--config", type=Path, help="model YAML (default: model.yaml beside the checkpoint)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model config value")
    ev.add_argument("--data", type=Path, help="COCO JSON, or the dataset root for the other formats")
    ev.add_argument("--format", choices=["coco", "yolo_seg", "instance_png", "davis", "synthetic"], default="coco")
    ev.add_argument("--images", type=Path, help="coco: the image folder (default: the JSON's folder)")
    ev.add_argument("--split", default="train2017", help="yolo_seg: images/<split>, labels/<split>")
    ev.add_argument("--categories", help="comma-separated category names to keep (e.g. person,car)")
    ev.add_argument("--class-agnostic", action="store_true", help="match detections to objects of any class")
    ev.add_argument("--count", type=int, default=100, help="synthetic: number of scenes")
    ev.add_argument("--seed", type=int, default=1_000_000, help="synthetic: first seed (training uses 0..)")
    ev.add_argument("--size", type=int, default=320, help="synthetic: scene height and width")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--out", default="eval_results.json", help="COCO results JSON (metrics go beside it)")
    ev.set_defaults(func=eval_command)

    syn = sub.add_parser("synthetic", help="write synthetic scenes as a COCO dataset and/or a video clip")
    syn.add_argument("--out", required=True, help="folder: images/, annotations.json, clip.mp4, clip_annotations.json")
    syn.add_argument("--count", type=int, default=100, help="scenes (0: none)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--height", type=int, default=320)
    syn.add_argument("--width", type=int, default=320)
    syn.add_argument("--clip-frames", type=int, default=0, help="also write a clip of this many frames")
    syn.add_argument("--fps", type=int, default=25)
    syn.set_defaults(func=synthetic_command)
