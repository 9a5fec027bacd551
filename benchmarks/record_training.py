"""Record a finished training run in benchmarks/results/: the command, iterations, wall and CPU
time, the final losses, the AP tables of its evaluations, and a copy of its loss-curve PNG.

    python benchmarks/record_training.py --run runs/synthetic_lite --name train_synthetic_lite \
        --command "maskstream train --config configs/train/synthetic_lite.yaml" \
        --eval held_out_synthetic=runs/synthetic_lite/heldout_results_metrics.json --note "..."

Prints the AP table last.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the run's output_dir")
    parser.add_argument("--name", required=True, help="results file stem")
    parser.add_argument("--command", action="append", default=[], help="a command that reproduces it (repeatable)")
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=METRICS_JSON", help="an evaluation")
    parser.add_argument("--note", action="append", default=[], help="a remark to keep with the figures")
    args = parser.parse_args()

    summary = json.loads((args.run / "summary.json").read_text())
    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    evaluations = {}
    for item in args.eval:
        name, _, path = item.partition("=")
        evaluations[name] = json.loads(Path(path).read_text())
    last = rows[-50:]
    record = {
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
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    shutil.copyfile(args.run / "loss_curves.png", RESULTS / f"{args.name}_loss.png")
    print(f"wrote {out} and {RESULTS / (args.name + '_loss.png')}")
    width = max([len(n) for n in evaluations] + [10]) + 2
    print(f"{'evaluation':{width}}{'type':6}{'AP':>8}{'AP50':>8}{'AP75':>8}")
    for name, metrics in evaluations.items():
        for iou_type, m in metrics.items():
            print(f"{name:{width}}{iou_type:6}{m['AP']:8.3f}{m['AP50']:8.3f}{m['AP75']:8.3f}")


if __name__ == "__main__":
    main()
