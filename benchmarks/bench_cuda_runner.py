"""TorchRunner throughput: frames/s of the static graph at a fixed input, per batch size and precision.

What runs is exactly what the pipeline's inference stage runs (model.runners.TorchRunner): batch
norms folded, on CUDA the Triton RoIAlign and a CUDA graph captured on the first call (when the
capture fails the runner goes on eagerly and says why in `graph_error`, reported here).
"fp16" is the runner's and the engine build's fp16 (model.static.with_precision): backbone + FPN and mask head +
predictor in float16, their outputs cast back to float32, so RPN, box head, NMS and RoIAlign stay float32.

    python benchmarks/bench_cuda_runner.py      # configs/model_v1.yaml: 800x1344, batch 1 and 8, fp16 + fp32
    python benchmarks/bench_cuda_runner.py --smoke --device cpu   # the tiny lite model, 2 calls per row, profiled

The model is configs/model_<variant>.yaml (or --model-config) with --set overrides, as in the CLI;
--height/--width/--batches replace its static shape.

Two timings per row, warm-ups (capture, autotuning, lazy init) excluded:
- infer: wall time of `runner.infer(its input_buffer(), sizes)` (page-locked on CUDA), host copies in
  and out included, what the pipeline's inference stage pays per batch;
- device: the runner's chosen path (graph replay or eager) on inputs already on the device, --iters
  calls back to back between two CUDA events: the GPU's own throughput (CPU: perf_counter).
FLOPs per frame are counted once with torch's FlopCounterMode on the eager fp32 graph (convolutions
and matrix products; the fixed-shape graph always runs its K mask-head slots and 1000 proposals,
so the count does not depend on the weights). Achieved TFLOP/s = GFLOP/frame x frames/s.

Weights: the parity goldens' (../shared/reference/golden_weights.py, or $MASKSTREAM_SHARED/reference)
when present, else the model's seeded init; timing does not depend on them except through how many
boxes pass the score threshold into NMS (--score-thresh 0 is the worst case). Prints a table last
and writes cuda_runner_<device>.json (see --out). --profile adds, per row,
where the forward's time goes: per model stage, custom op and kernel (pipeline/bench/runner_profile.py).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from golden_state import golden_state  # benchmarks/, beside this script
from maskstream.configs import CONFIG_DIR
from maskstream.model.config import ModelConfig
from maskstream.model.fuse import fold_batch_norms
from maskstream.model.mask_rcnn import build
from maskstream.model.runners import TorchRunner, configure_process
from maskstream.model.static import StaticMaskRCNN, with_precision
from maskstream.model.synthetic import scene_batch
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.bench.runner_profile import format_profile, profile_forward
from maskstream.pipeline.bench.smoke import TINY_MODEL
from maskstream.pipeline.config import load_config
from options import add_device_option, add_output_options, parse_args, results_file
from torch.utils.flop_counter import FlopCounterMode

# Dense fp16/bf16 matrix-product rate measured on the lent H200 (8192^3, ~790 TFLOP/s): the
# ceiling the achieved rate is compared with. On another GPU pass --peak-tflops.
H200_PEAK_TFLOPS = 790.0


def frames(batch: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic scenes (shapes over textured backgrounds) as uint8 [B, 3, H, W] and sizes [B, 2]."""
    return scene_batch(batch, height, width), np.array([[height, width]] * batch, dtype=np.int64)


def count_gflop(static: StaticMaskRCNN, device: str) -> float:
    """GFLOP of one eager forward of `static` (batch as built), per frame."""
    images, sizes = static.example_inputs(device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        static(images, sizes)
    return counter.get_total_flops() / 1e9 / static.shape[0]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(runner: TorchRunner, images: np.ndarray, sizes: np.ndarray, iters: int, warmup: int) -> dict[str, Any]:
    device = runner.device
    # Filled in place, as the inference stage does: on CUDA the runner's page-locked batch.
    runner.input_buffer()[...] = images
    images = runner.input_buffer()
    start = time.perf_counter()
    out = runner.infer(images, sizes)  # CUDA: warm-up on a side stream + graph capture, or eager
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        runner.infer(images, sizes)
    walls = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.infer(images, sizes)
        walls.append(time.perf_counter() - start)

    # Device throughput: the runner's own path (replay or eager) on device-resident inputs.
    dev_in = (torch.from_numpy(images).to(device), torch.from_numpy(sizes).to(device))
    run = runner._run  # private: the chosen path without infer()'s host copies
    run(*dev_in)
    sync(device)
    if device == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            run(*dev_in)
        end.record()
        end.synchronize()
        device_s = begin.elapsed_time(end) / 1e3 / iters
    else:
        start = time.perf_counter()
        for _ in range(iters):
            run(*dev_in)
        device_s = (time.perf_counter() - start) / iters
    batch = images.shape[0]
    infer_s = statistics.median(walls)
    return {
        "first_call_s": first_s,
        "infer_ms_per_batch": {"median": infer_s * 1e3, "min": min(walls) * 1e3, "max": max(walls) * 1e3},
        "infer_fps": batch / infer_s,
        "device_ms_per_batch": device_s * 1e3,
        "device_fps": batch / device_s,
        "mean_detections": float(out["num_detections"].mean()),
        "cuda_graph": runner._graph is not None,
        "graph_error": runner.graph_error,
        "compile_error": runner.compile_error,
    }


def profile_row(runner: TorchRunner, images: np.ndarray, sizes: np.ndarray) -> dict[str, Any]:
    """{"profile": ...} of the runner's forward, or {"profile_error": ...}: a failed profile keeps the row's timings."""
    try:
        on_device = (torch.from_numpy(images).to(runner.device), torch.from_numpy(sizes).to(runner.device))
        # A compiled runner's own forward (kernels and ops, no stages: see runner_profile).
        return {"profile": profile_forward(runner.static, *on_device,
                                           forward=runner._forward if runner.compiled else None)}
    except Exception as exc:
        return {"profile_error": f"{type(exc).__name__}: {exc}"}


def _label(row: dict[str, Any]) -> str:
    return f"{row['precision']} batch {row['batch']}" + (" compiled" if row["compiled"] else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_option(parser)
    parser.add_argument("--variant", choices=["v1", "v2", "lite"], default="v1",
                        help="picks configs/model_<variant>.yaml unless --model-config names one")
    parser.add_argument("--model-config", type=Path, help="model YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model config value")
    parser.add_argument("--height", type=int, help="input height (default: the config's static.height)")
    parser.add_argument("--width", type=int, help="input width (default: the config's static.width)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", choices=["fp16", "fp32"], default=["fp16", "fp32"])
    parser.add_argument("--iters", type=int, default=30, help="timed calls per row (each timing)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
    parser.add_argument("--score-thresh", type=float, help="box score threshold (default: the config's)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run eagerly on CUDA")
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"],
                        help="TorchRunner(compile=...): the forward through torch.compile; 'off on' measures both, "
                             "side by side (a compiled row's profile has its kernels and ops, no stages)")
    parser.add_argument("--channels-last", action="store_true",
                        help="convolutions in NHWC on CUDA too (the runner's CUDA default is NCHW)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="float32 products and convolutions in float32 on CUDA (default: TF32, as TensorRT)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms (process-wide; the pipeline does not)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each row: time per model stage, custom op and top kernels")
    parser.add_argument("--peak-tflops", type=float, default=H200_PEAK_TFLOPS,
                        help="dense fp16 rate to compare with (default: measured on the lent H200)")
    add_output_options(parser)
    args = parse_args(parser, {"variant": "lite", "set": list(TINY_MODEL), "batches": [1], "iters": 2, "warmup": 0,
                               "profile": True})
    out = results_file(parser, args, f"cuda_runner_{args.device}.json")
    torch.set_flush_denormal(True)  # as the CLI does: CPU float32 denormals from random weights
    configure_process(tf32=not args.no_tf32)  # as the inference stage's entry point does
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True

    overrides = list(args.set)
    if args.score_thresh is not None:
        overrides.append(f"roi_heads.score_thresh={args.score_thresh}")
    cfg = load_config(ModelConfig, args.model_config or CONFIG_DIR / f"model_{args.variant}.yaml", overrides)
    shape = dataclasses.replace(cfg.static, batch=1, height=args.height or cfg.static.height,
                                width=args.width or cfg.static.width)
    cfg = dataclasses.replace(cfg, static=shape)
    args.height, args.width = shape.height, shape.width
    state = golden_state(cfg.variant) if cfg.num_classes == 91 else None
    torch.manual_seed(0)
    folded = fold_batch_norms(build(config=cfg, checkpoint=state).eval())
    k = shape.detections
    gflop = count_gflop(StaticMaskRCNN(folded, shape).to(args.device), args.device)
    print(f"{cfg.variant} {args.height}x{args.width}: {gflop:.1f} GFLOP/frame counted (K={k})", file=sys.stderr)

    images, sizes = frames(max(args.batches), args.height, args.width)  # every row takes its first B
    rows = []
    for precision in args.precisions:
        # A copy with the precision's casts (model.static.with_precision, as the runner and the
        # engine build apply them), folded first: the norm scales merge in float32, then round once.
        net = with_precision(copy.deepcopy(folded), precision)
        for batch, compiled in itertools.product(args.batches, [mode == "on" for mode in args.compile]):
            # Each row its own copy: a runner converts its module's layout in place (channels_last).
            static = StaticMaskRCNN(copy.deepcopy(net), dataclasses.replace(shape, batch=batch))
            row: dict[str, Any] = {"precision": precision, "batch": batch, "compiled": compiled,
                                   "channels_last": args.channels_last or args.device == "cpu"}
            try:
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                runner = TorchRunner(static, device=args.device, cuda_graph=not args.no_cuda_graph,
                                     tf32=not args.no_tf32, compile=compiled, channels_last=row["channels_last"])
                row.update(measure(runner, images[:batch], sizes[:batch], args.iters, args.warmup))
                if args.device == "cuda":
                    row["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                row["achieved_tflops"] = gflop * row["device_fps"] / 1e3
                if args.profile:
                    row.update(profile_row(runner, images[:batch], sizes[:batch]))
                del runner
            except Exception as exc:  # one failing row (out of memory, say) must not lose the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            print(f"  {_label(row)}: " + (row.get("error") or
                  f"{row['device_fps']:.1f} frames/s on device, {row['infer_fps']:.1f} through infer(), "
                  f"first call {row['first_call_s']:.1f} s"), file=sys.stderr)
            if args.device == "cuda":
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    result = {
        "benchmark": "TorchRunner frames/s, static graph",
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "device": device_name,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "variant": cfg.variant,
        "model_config": str(args.model_config or CONFIG_DIR / f"model_{args.variant}.yaml"),
        "overrides": overrides,
        "input_hw": [args.height, args.width],
        "detections_k": k,
        "score_thresh": cfg.roi_heads.score_thresh,
        "weights": "golden (torchvision parity)" if state is not None else "seeded init",
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "tf32": args.device == "cuda" and not args.no_tf32,
        "gflop_per_frame": gflop,
        "peak_tflops_compared": args.peak_tflops,
        "floor_ms_per_frame": gflop / args.peak_tflops,
        "iters": args.iters,
        "smoke": args.smoke,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"TorchRunner {cfg.variant} {args.height}x{args.width} on {device_name}, {gflop:.0f} GFLOP/frame, "
          f"floor {result['floor_ms_per_frame']:.2f} ms/frame at {args.peak_tflops:g} TFLOP/s")
    print(f"{'prec':<5} {'batch':>5} {'comp':>4} {'graph':>5} {'ms/batch':>9} {'frames/s':>9} {'infer ms':>9} "
          f"{'infer f/s':>9} {'TFLOP/s':>8} {'of peak':>7} {'GPU GB':>7}")
    for row in rows:
        if "error" in row:
            print(f"{_label(row)}  failed: {row['error']}")
            continue
        mem = row.get("peak_gpu_memory_gb")
        tflops = row["achieved_tflops"]
        print(f"{row['precision']:<5} {row['batch']:>5} {'yes' if row['compiled'] else 'no':>4} "
              f"{'yes' if row['cuda_graph'] else 'no':>5} "
              f"{row['device_ms_per_batch']:>9.2f} {row['device_fps']:>9.1f} "
              f"{row['infer_ms_per_batch']['median']:>9.2f} {row['infer_fps']:>9.1f} "
              f"{tflops:>8.1f} {tflops / args.peak_tflops:>7.1%} {'-' if mem is None else f'{mem:.1f}':>7}")
        if row["graph_error"] and args.device == "cuda":
            print(f"      graph_error: {row['graph_error'][:300]}")
        if row["compile_error"]:
            print(f"      compile_error: {row['compile_error'][:300]}")
    for row in rows:
        if "profile" in row:
            print(f"\n{_label(row)}, {format_profile(row['profile'])}")
        elif "profile_error" in row:
            print(f"\n{_label(row)}: profile failed: {row['profile_error']}")
    print(f"wrote {out}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
