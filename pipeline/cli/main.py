"""`maskstream` command line. The only module that prints or exits.

Building the parser imports only light modules; each command's handler imports its heavy
dependencies (torch, the model, the pipeline runtime, PyAV, OpenCV) inside itself. `maskstream
--help` and `maskstream subscribe` then start without torch, and so does every stage process
that a run spawns: spawn imports the `maskstream` script, and with it this module, again in
each child. The other CLI modules follow the same rule.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskstream.configs import CONFIG_DIR, shipped_configs
from maskstream.model.config import ModelConfig
from maskstream.model.zoo import DownloadError
from maskstream.pipeline import logs
from maskstream.pipeline.cli import prepare_torch
from maskstream.pipeline.cli.bench import add_parsers as add_bench_parsers
from maskstream.pipeline.cli.files import new_run_dir, refuse_existing
from maskstream.pipeline.cli.fleet import add_parsers as add_fleet_parsers
from maskstream.pipeline.cli.options import HelpFormatter, add_logging, add_model_name, config_file, subcommand
from maskstream.pipeline.cli.run import add_parsers as add_run_parsers
from maskstream.pipeline.cli.subscribe import add_parsers as add_subscribe_parsers
from maskstream.pipeline.cli.train import add_parsers as add_training_parsers
from maskstream.pipeline.config import ConfigError, load_config
from maskstream.plugins.tensorrt_env import TensorRTUnavailable

if TYPE_CHECKING:
    from maskstream.pipeline.runtime.messages import Detections, Header

log = logging.getLogger("maskstream")


def model_config(args: argparse.Namespace) -> ModelConfig:
    path = args.config or CONFIG_DIR / f"model_{args.variant}.yaml"
    cfg = load_config(ModelConfig, path, args.set)
    if args.config is None and cfg.variant != args.variant:
        raise ConfigError(f"{path}: variant {cfg.variant!r} does not match --variant {args.variant}")
    return cfg


def image_paths(inputs: list[str]) -> list[Path]:
    from maskstream.pipeline.media.images import IMAGE_SUFFIXES

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)  # a missing file is reported when it is read, with the others going on
    return paths


def segment_model(args: argparse.Namespace) -> tuple[ModelConfig, Path | None]:
    """--model, --checkpoint or --config: the model they choose (as `run` chooses it); none of
    them: the bundled model for --variant lite, else --variant's untrained config."""
    from maskstream.model.bundled import BUNDLED_CHECKPOINT, BUNDLED_CONFIG
    from maskstream.pipeline.run_config import ModelSelection, choose_model, fetch_model

    if args.model is None and args.checkpoint is None and args.config is None:
        if args.variant == "lite" and BUNDLED_CHECKPOINT.is_file():
            # The default: the bundled lite model, trained on the synthetic shapes the sample scenes show.
            log.info("no --model or --checkpoint given: using the bundled model %s", BUNDLED_CHECKPOINT.name)
            return load_config(ModelConfig, BUNDLED_CONFIG, args.set), BUNDLED_CHECKPOINT
        log.warning("no --model or --checkpoint given, so the detection heads are untrained and the detections "
                    "are not meaningful")
        return model_config(args), None
    selection = ModelSelection(name=args.model, config=args.config, checkpoint=args.checkpoint,
                               overrides=tuple(args.set))
    fetch_model(selection)
    chosen = choose_model(selection)
    log.info("model %s (config %s)", chosen.checkpoint, chosen.config_from)
    return chosen.config, chosen.checkpoint


def segment(args: argparse.Namespace) -> int:
    import torch
    from maskstream.model.coco import class_names
    from maskstream.model.fuse import fold_batch_norms
    from maskstream.model.mask_rcnn import build
    from maskstream.model.synthetic import write_sample_images
    from maskstream.pipeline.media.annotate import draw_detections
    from maskstream.pipeline.media.images import read_rgb, write_rgb
    from maskstream.pipeline.results import frame_record, masks
    from maskstream.pipeline.runtime.messages import Header

    prepare_torch()
    if args.out is not None:
        refuse_existing([Path(args.out) / "results.jsonl"], args.overwrite)
    cfg, checkpoint = segment_model(args)
    weights_backbone = "imagenet" if checkpoint is None and cfg.variant == "lite" else None
    net = fold_batch_norms(build(config=cfg, checkpoint=checkpoint, weights_backbone=weights_backbone))
    names = class_names(cfg.num_classes, cfg.class_names)
    # a new run directory (the default) is made once nothing can refuse the run
    out_dir = Path(args.out) if args.out is not None else new_run_dir(Path("runs"), "segment")

    paths = image_paths(args.images) if args.images else write_sample_images(out_dir / "samples", count=4, seed=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    with open(out_dir / "results.jsonl", "w", encoding="utf-8") as results:
        for index, path in enumerate(paths):
            try:
                image = read_rgb(path)
            except (OSError, ValueError) as exc:  # one bad file never stops the others
                print(f"error: {exc}", file=sys.stderr)
                failures += 1
                continue
            start = time.perf_counter()
            [out] = net.predict([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
            seconds = time.perf_counter() - start
            # An image is a one-frame stream: the same Detections the pipeline publishes, so its
            # record and masks come from the same code as `maskstream run`'s.
            det = image_detections(out, Header(path.stem, index), image.shape[:2], names)
            results.write(json.dumps({"image": str(path), **frame_record(det)}) + "\n")
            annotated = draw_detections(image, det.boxes, det.labels, det.scores, masks(det), names)
            write_rgb(out_dir / "annotated" / f"{path.stem}.png", annotated)
            print(f"{path.name}: {len(det.rle_counts)} detections in {seconds:.2f} s")
    print(f"wrote {out_dir / 'results.jsonl'} and {out_dir / 'annotated'}/")
    return 1 if failures else 0


def image_detections(
    out: dict[str, Any], header: Header, image_hw: tuple[int, ...], names: Sequence[str]
) -> Detections:
    """MaskRCNN.predict's output for one image (boxes in image pixels) as a Detections message."""
    import numpy as np
    from maskstream.model.rle import encode_box_cropped_rle
    from maskstream.pipeline.runtime.messages import Detections

    frame_hw = (int(image_hw[0]), int(image_hw[1]))
    crop_boxes, counts = np.zeros((len(out["boxes"]), 4), dtype=np.int32), []
    for i, (box, probs) in enumerate(zip(out["boxes"], out["mask_probs"])):
        rle, crop_boxes[i] = encode_box_cropped_rle(probs, box, frame_hw)
        counts.append(rle["counts"].encode("ascii"))
    labels = out["labels"].numpy().astype(np.int32)
    return Detections(
        header, frame_hw, out["boxes"].numpy(), out["scores"].numpy(), labels,
        tuple(names[label] for label in labels.tolist()), crop_boxes, tuple(counts),
    )


def build_engine_command(args: argparse.Namespace) -> int:
    from maskstream.model.engine import build_engine

    prepare_torch()
    cfg = model_config(args)
    out = Path(args.out)
    manifest = build_engine(args.checkpoint, cfg, out, precision=args.precision)
    print(
        f"wrote {out} and {out.with_suffix('.json')}: {manifest.precision}, input {list(manifest.input_shape)} uint8, "
        f"K={manifest.detections}, TensorRT {manifest.tensorrt_version}"
    )
    return 0


def _package(module: str, distribution: str) -> str:
    """Version of an optional package found without importing it (importing zmq is the transport's job)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def doctor(args: argparse.Namespace) -> int:
    import importlib.util

    import torch
    from maskstream.model.runners import RunnerSpec, runner_choice
    from maskstream.plugins.tensorrt_env import tensorrt_version, torch_tensorrt_version

    cuda_build = torch.version.cuda
    if torch.cuda.is_available():
        cuda = f"available: {torch.cuda.get_device_name(0)} (CUDA {cuda_build})"
    else:
        cuda = "not available" + (f" (torch built with CUDA {cuda_build}, but no device)" if cuda_build else "")
    trt = tensorrt_version()
    tt = torch_tensorrt_version()
    rows = [
        ("torch", f"{torch.__version__} ({'CUDA ' + cuda_build + ' build' if cuda_build else 'CPU-only build'})"),
        ("CUDA", cuda),
        ("Triton", _package("triton", "triton")),
        ("TensorRT", trt or "not installed"),
        ("torch-tensorrt", tt or "not installed"),
        ("PyAV", _package("av", "av")),
        ("ZeroMQ", _package("zmq", "pyzmq")),
        ("OpenCV", _package("cv2", "opencv-python-headless")),
        ("pycocotools", _package("pycocotools", "pycocotools")),
    ]
    choice = runner_choice(RunnerSpec(engine=args.engine))
    runner = {
        "tensorrt": f"TensorRTRunner ({args.engine})" + ("" if trt else " -- would fail: TensorRT not installed"),
        "torch-cuda": "TorchRunner on cuda (no --engine given)" + (
            "; RoIAlign and NMS in Triton, the forward torch.compile'd at start (model.compile) and replayed as "
            "a CUDA graph" if importlib.util.find_spec("triton")
            else "; without Triton, RoIAlign and NMS fall back to torch code that waits on the host: no CUDA graph"),
        "torch-cpu": "TorchRunner on cpu (no --engine given, no CUDA device)",
    }[choice]
    rows.append(("runner", runner))
    # where to copy one from to edit; named as the documentation names them, they work from any folder
    rows.append(("configs", f"{CONFIG_DIR} ({', '.join(shipped_configs())})"))
    from maskstream.pipeline.run_config import remove_dead_runs

    leftovers = remove_dead_runs(args.endpoint_dir)
    rows.append(("leftovers", f"removed {leftovers.describe()}" if leftovers
                 else "none (no shared-memory rings or socket folders of dead runs)"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def add_model_options(parser: argparse.ArgumentParser, default_variant: str, checkpoint_required: bool) -> None:
    """The options that choose a model, the same for every command that loads one (read by model_config)."""
    parser.add_argument("--variant", choices=["v1", "v2", "lite"], default=default_variant,
                        help="the architecture, when no config names it")
    parser.add_argument("--config", type=config_file, help="model YAML (default: configs/model_<variant>.yaml)")
    parser.add_argument(
        "--checkpoint", type=Path, required=checkpoint_required, help="model weights (ours or torchvision's Mask R-CNN)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config value (repeatable)")


SEGMENT_EXAMPLES = """
  maskstream segment                                   # generated sample scenes, bundled model, into runs/segment-N
  maskstream segment photos/ --model maskrcnn_resnet50_fpn_coco --out out/
  maskstream segment a.jpg --checkpoint maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth   # config read from its keys
"""
BUILD_ENGINE_EXAMPLES = """
  maskstream build-engine --checkpoint runs/train/model_final.pt --config runs/train/model.yaml --out m.engine
  maskstream build-engine --variant v1 --checkpoint maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out r50.engine \
      --precision fp16
"""
DOCTOR_EXAMPLES = """
  maskstream doctor
  maskstream doctor --engine r50.engine
"""
TOP_EXAMPLES = """
  maskstream run --source street.mp4 --model maskrcnn_resnet50_fpn_coco    # results in runs/run-N
  maskstream subscribe tcp://127.0.0.1:5556 --stream cam0
  maskstream <command> --help                                              # each command's options and examples
"""


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("maskstream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a distribution)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskstream", description="Streaming Mask R-CNN instance segmentation",
                                     epilog="examples:\n" + TOP_EXAMPLES.strip("\n"), formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    seg = subcommand(sub, "segment", "segment still images (default: the built-in synthetic sample scenes)",
                     SEGMENT_EXAMPLES)
    seg.add_argument("images", nargs="*", help="image files or folders (default: generated sample scenes)")
    seg.add_argument("--out", help="output folder: results.jsonl, annotated/*.png (default: a new runs/segment-N)")
    seg.add_argument("--overwrite", action="store_true", help="replace the results.jsonl of an earlier run in --out")
    add_model_name(seg)
    add_model_options(seg, default_variant="lite", checkpoint_required=False)
    add_logging(seg)
    seg.set_defaults(func=segment)

    eng = subcommand(sub, "build-engine", "compile a checkpoint into a TensorRT engine + JSON manifest",
                     BUILD_ENGINE_EXAMPLES)
    add_model_options(eng, default_variant="v1", checkpoint_required=True)
    eng.add_argument("--out", required=True, help="engine file NAME.engine; the manifest goes to NAME.json")
    eng.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="the engine's precision")
    add_logging(eng)
    eng.set_defaults(func=build_engine_command)

    doc = subcommand(sub, "doctor", "show which optional pieces are installed and which runner would be used; "
                     "remove what killed runs left (shared memory, socket folders)", DOCTOR_EXAMPLES)
    doc.add_argument("--engine", type=Path, help="an engine file, to show the runner it would get")
    doc.add_argument("--endpoint-dir", type=Path,
                     help="where runs make their socket folders (transport.endpoint_dir; default: the system's "
                          "temporary folder): dead runs' folders there, and their rings, are removed")
    add_logging(doc)
    doc.set_defaults(func=doctor)
    add_run_parsers(sub)
    add_bench_parsers(sub)
    add_subscribe_parsers(sub)
    add_training_parsers(sub)
    add_fleet_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # A bare `maskstream` is a usage error for a script (it did nothing), and a question for a
        # person: the commands and examples go to stderr with argparse's usage-error status.
        parser.print_help(sys.stderr)
        return 2
    logs.configure(args.log_level)
    # ValueError also covers model.checkpoint's CheckpointError, a module that imports torch
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, TensorRTUnavailable, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
