"""Record a finished training run in benchmarks/results/: the command, iterations, wall and CPU
time, the final losses, the AP tables of its evaluations, and a copy of its loss-curve PNG.

    python benchmarks/record_training.py --run runs/synthetic_lite --name train_synthetic_lite \
        --command "maskstream train --config configs/train/synthetic_lite.yaml" \
        --eval held_out_synthetic=runs/synthetic_lite/heldout_results_metrics.json --note "..."

Writes NAME.json and NAME_loss.png (see --out). --smoke: first trains a real run at tiny sizes
(`maskstream train`, 3 iterations on four 96x96 synthetic scenes, evaluated on two) into a
temporary folder, then records that. Prints the AP table last.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from maskstream.configs import CONFIG_DIR
from options import add_output_options, parse_args, results_file  # benchmarks/, beside this script

# The smoke run's settings over configs/train/synthetic_lite.yaml: the bundled model's config
# (found through the package: the YAML names it relative to a checkout), few proposals, no
# pretrained backbone to load.
SMOKE_TRAINING = [
    f"model.config={CONFIG_DIR / 'model_lite_shapes.yaml'}", "model.init=none",
    "solver.max_iters=3", "solver.warmup_iters=1",
    "data.train.synthetic={count: 4, seed: 0, height: 96, width: 96}",
    "data.val.synthetic={count: 2, seed: 1000000, height: 96, width: 96}",
    "model.overrides=[transform.min_size=96, transform.max_size=96, rpn.pre_nms_top_n_train=200, "
    "rpn.post_nms_top_n_train=100, rpn.pre_nms_top_n_test=100, rpn.post_nms_top_n_test=50, "
    "roi_heads.batch_size_per_image=32, roi_heads.detections_per_img=10]",
]


def train_smoke_run(folder: Path) -> tuple[Path, list[str], list[str]]:
    """(run folder, commands, evaluations) of a tiny real training run made in `folder`."""
    run = folder / "run"
    sets = [*SMOKE_TRAINING, f"output_dir={run}"]
    command = [sys.executable, "-m", "maskstream.pipeline.cli", "train",
               "--config", str(CONFIG_DIR / "train" / "synthetic_lite.yaml"),
               *(item for value in sets for item in ("--set", value))]
    subprocess.run(command, check=True, stdout=sys.stderr)
    return run, [shlex.join(["maskstream", *command[3:]])], [f"held_out_synthetic={run / 'val_results_metrics.json'}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="the run's output_dir (required unless --smoke)")
    parser.add_argument("--name", help="results file stem (required unless --smoke)")
    parser.add_argument("--command", action="append", default=[], help="a command that reproduces it (repeatable)")
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=METRICS_JSON", help="an evaluation")
    parser.add_argument("--note", action="append", default=[], help="a remark to keep with the figures")
    add_output_options(parser)
    args = parse_args(parser, {"name": "train_smoke"})
    if not args.smoke and (args.run is None or args.name is None):
        parser.error("--run and --name are required (or --smoke)")
    out = results_file(parser, args, f"{args.name}.json")
    with tempfile.TemporaryDirectory(prefix="maskstream-smoke-") as folder:
        if args.smoke and args.run is None:
            args.run, commands, evaluations = train_smoke_run(Path(folder))
            args.command += commands
            args.eval += evaluations
        record(args, out)
    return 0


def record(args: argparse.Namespace, out: Path) -> None:
    summary = json.loads((args.run / "summary.json").read_text())
    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    evaluations = {}
    for item in args.eval:
        name, _, path = item.partition("=")
        evaluations[name] = json.loads(Path(path).read_text())
    last = rows[-50:]
    entry = {
        "commands": args.command,
        "config": (args.run / "config.yaml").read_text(),
        "model_config": (args.run / "model.yaml").read_text(),
        "iterations": summary["iterations"],
        "wall_seconds": summary["wall_seconds"],
        "cpu_seconds": summary["cpu_seconds"],
        "mean_iteration_seconds": round(sum(r["seconds"] for r in rows) / len(rows), 3),
        "final_losses_mean_of_last_50": {
            k: round(sum(r[k] for r in last) / len(last), 4) for k in rows[-1] if k.startswith(("loss", "total"))
        },
        "evaluations": evaluations,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "notes": args.note,
        "smoke": args.smoke,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entry, indent=2) + "\n")
    png = out.with_name(f"{out.stem}_loss.png")
    shutil.copyfile(args.run / "loss_curves.png", png)
    print(f"wrote {out} and {png}")
    width = max([len(n) for n in evaluations] + [10]) + 2
    print(f"{'evaluation':{width}}{'type':6}{'AP':>8}{'AP50':>8}{'AP75':>8}")
    for name, metrics in evaluations.items():
        for iou_type, m in metrics.items():
            print(f"{name:{width}}{iou_type:6}{m['AP']:8.3f}{m['AP50']:8.3f}{m['AP75']:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
