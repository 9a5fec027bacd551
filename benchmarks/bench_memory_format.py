"""TorchRunner with its convolutions in NCHW vs channels_last (NHWC), side by side in one process.

Same weights, same frames, rounds interleaved (NCHW, NHWC, NCHW, ...) so the host's drift hits
both; reports ms/frame per layout, the ratio, and the largest output difference between them.

    python benchmarks/bench_memory_format.py                          # bundled lite on CPU
    python benchmarks/bench_memory_format.py --device cuda --model-config configs/model_v1.yaml \
        --precision fp16 --set static.batch=8                         # R50-FPN 800x1344 on a GPU

Without --model-config: the bundled model (its config and weights); otherwise that config with
its seeded initialisation. Prints a table and writes <device>_channels_last.json (see --out) with
the machine and the command. --smoke: the tiny lite model, one round of one call per layout.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from maskstream.model.bundled import BUNDLED_CHECKPOINT, BUNDLED_CONFIG
from maskstream.model.config import ModelConfig
from maskstream.model.mask_rcnn import build
from maskstream.model.runners import TorchRunner, configure_process
from maskstream.model.synthetic import scene_batch
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.bench.smoke import TINY_MODEL, TINY_MODEL_CONFIG
from maskstream.pipeline.config import load_config
from options import add_device_option, add_output_options, parse_args, results_file  # benchmarks/, beside this script


def timed(runner: TorchRunner, sizes: np.ndarray, iters: int) -> float:
    """Seconds per infer() call, median of `iters` calls."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.infer(runner.input_buffer(), sizes)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_option(parser, default="cpu")
    parser.add_argument("--model-config", type=Path, help="model YAML (default: the bundled model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8, help="infer() calls per layout per round")
    add_output_options(parser)
    args = parse_args(parser, {"model_config": TINY_MODEL_CONFIG, "set": list(TINY_MODEL), "rounds": 1, "iters": 1})
    out = results_file(parser, args, f"{args.device}_channels_last.json")
    torch.set_flush_denormal(True)  # as the CLI does
    configure_process()  # as the inference stage's entry point does
    cfg = load_config(ModelConfig, args.model_config or BUNDLED_CONFIG, args.set)
    torch.manual_seed(0)
    net = build(config=cfg, checkpoint=None if args.model_config else BUNDLED_CHECKPOINT).eval()
    runners = {layout: TorchRunner(net, device=args.device, precision=args.precision,
                                   channels_last=layout == "channels_last") for layout in ("nchw", "channels_last")}
    b, _, h, w = runners["nchw"].input_shape
    sizes = np.array([[h, w]] * b, dtype=np.int64)
    frames = scene_batch(b, h, w)
    outputs = {}
    for layout, runner in runners.items():
        runner.input_buffer()[...] = frames
        for _ in range(2):  # warm-up: lazy set-up, and on CUDA the graph capture
            outputs[layout] = runner.infer(runner.input_buffer(), sizes)
    difference = {name: float(np.abs(outputs["nchw"][name].astype(np.float64)
                                      - outputs["channels_last"][name].astype(np.float64)).max())
                  for name in outputs["nchw"]}
    rounds: dict[str, list[float]] = {layout: [] for layout in runners}
    for _ in range(args.rounds):
        for layout, runner in runners.items():
            rounds[layout].append(timed(runner, sizes, args.iters) / b * 1e3)
    ms = {layout: statistics.median(values) for layout, values in rounds.items()}
    result = {
        "what": "TorchRunner ms/frame, convolutions NCHW vs channels_last, interleaved rounds, median",
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": str(args.model_config or "bundled"), "overrides": args.set, "precision": args.precision,
        "input": [b, 3, h, w],
        "ms_per_frame_rounds": rounds,
        "ms_per_frame": ms,
        "speedup_channels_last": ms["nchw"] / ms["channels_last"],
        "max_output_difference": difference,
        "smoke": args.smoke,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'layout':<14} {'ms/frame':>9}  rounds")
    for layout in runners:
        print(f"{layout:<14} {ms[layout]:9.1f}  " + ", ".join(f"{v:.1f}" for v in rounds[layout]))
    print(f"channels_last speed-up {result['speedup_channels_last']:.2f}x; largest output difference "
          f"boxes {difference['boxes']:.2g} px, mask probabilities {difference['mask_probs']:.2g}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
