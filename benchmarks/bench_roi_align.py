"""Multi-level RoIAlign: our op vs the per-level torch loop, on the same device and inputs.

  op:              torch.ops.maskstream.multiscale_roi_align; on CUDA the Triton kernel
                   (plugins/roi_align/kernel.py), on CPU the sampling-matrix product
  per_level_loop:  model.ops.roi_align.multiscale_roi_align_per_level_loop, torchvision's
                   MultiScaleRoIAlign way: assign levels, pool each level's boxes, scatter back
  torchvision:     torchvision.ops.MultiScaleRoIAlign itself (its own CUDA/CPU kernel), where
                   torchvision is installed: the baseline a user would otherwise run

Inputs are the box head's at R50-FPN's 800x1344: P2..P5 with 256 channels (200x336 ... 25x42),
1000 boxes per image drawn log-uniformly in size (16..800 px, aspect 1:2..2:1), so that every level
gets boxes, as RPN proposals do; 7x7 output, sampling ratio 2. Each implementation is checked
against the op before it is timed. float16 rows take float16 boxes (the op wants one dtype); their
area overflows above 256x256 px, which torchvision's level mapping sends to P5, so the level split
differs from float32's (the JSON lists boxes per level). The model itself pools float32.

    python benchmarks/bench_roi_align.py --device cuda                    # issue 3's GPU figure
    python benchmarks/bench_roi_align.py --device cpu --repeats 3 --batches 1
    python benchmarks/bench_roi_align.py --smoke     # 256x320 features, 16 channels, 100 boxes, batch 1

Timing: on CUDA `triton.testing.do_bench` (median, L2 flushed between calls, so every call reads
its features from memory as it would inside the model); on CPU the median of --repeats
perf_counter runs after one warm-up. Prints a table last and writes roi_align_<device>.json (see --out).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from maskstream.model.ops import multiscale_roi_align
from maskstream.model.ops.roi_align import RoIAlignAttrs, assign_levels, multiscale_roi_align_per_level_loop
from maskstream.pipeline.bench.measure import machine
from options import add_device_option, add_output_options, parse_args, results_file  # benchmarks/, beside this script

DTYPES = {"float32": torch.float32, "float16": torch.float16}
SAMPLING_RATIO = 2


def pyramid(batch: int, channels: int, height: int, width: int, dtype: torch.dtype, device: str,
            gen: torch.Generator) -> list[torch.Tensor]:
    """P2..P5 [B, C, H/2**k, W/2**k] for k = 2..5, standard normal like FPN outputs."""
    return [torch.randn((batch, channels, height >> k, width >> k), generator=gen).to(device, dtype)
            for k in range(2, 6)]


def proposal_boxes(batch: int, count: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """[B, R, 4] boxes inside the image, sides log-uniform in 16..800 px, aspect 1:2..2:1."""
    size = torch.exp(torch.empty(batch, count).uniform_(math.log(16.0), math.log(800.0), generator=gen))
    aspect = torch.exp(torch.empty(batch, count).uniform_(-math.log(2.0), math.log(2.0), generator=gen))
    w = (size * aspect.sqrt()).clamp(max=width)
    h = (size / aspect.sqrt()).clamp(max=height)
    x1 = torch.rand(batch, count, generator=gen) * (width - w)
    y1 = torch.rand(batch, count, generator=gen) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], -1)


def torchvision_pool(features: list[torch.Tensor], boxes: torch.Tensor, output_size: int,
                     image_hw: tuple[int, int]) -> Callable[[], torch.Tensor] | None:
    """torchvision's MultiScaleRoIAlign over the same inputs -> [B, R, C, S, S], or None without it."""
    try:
        from torchvision.ops import MultiScaleRoIAlign
    except ImportError:
        return None
    pool = MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size, SAMPLING_RATIO)
    named = dict(zip(["p2", "p3", "p4", "p5"], features))
    per_image = list(boxes.unbind(0))
    b, r = boxes.shape[:2]
    return lambda: pool(named, per_image, [image_hw] * b).view(b, r, *features[0].shape[1:2], output_size, output_size)


def time_cuda(fn: Callable[[], Any], rep_ms: int) -> list[float]:
    """[median, p20, p80] seconds per call (do_bench: warm-up, L2 flush, CUDA events)."""
    from triton.testing import do_bench

    return [ms / 1e3 for ms in do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])]


def time_cpu(fn: Callable[[], Any], repeats: int) -> list[float]:
    """[median, min, max] seconds per call over `repeats` runs after one warm-up."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return [statistics.median(runs), min(runs), max(runs)]


def device_facts(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"device": device}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(name=props.name, capability=list(torch.cuda.get_device_capability(0)),
                     multiprocessors=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1),
                     cuda_runtime=torch.version.cuda)
    return facts


def table(result: dict[str, Any]) -> str:
    """The results as text: per batch and dtype, ms per call and the loop's (and torchvision's) ratio to the op."""
    s = result["output_size"]
    h, w = result["image_hw"]
    lines = [f"RoIAlign {result['boxes_per_image']} boxes/image, {h}x{w} FPN features ({result['features'][0][0]} ch), "
             f"{s}x{s}, on {result['device'].get('name', result['device']['device'])}",
             f"{'batch':>5} {'dtype':<8} {'op ms':>9} {'loop ms':>9} {'loop/op':>8} {'tv ms':>9} {'tv/op':>7} "
             f"{'max |loop-op|':>14}"]
    for row in result["rows"]:
        t, ratio = row["seconds"], row.get("speedup_over", {})
        ms = {key: f"{t[key][0] * 1e3:.3f}" if key in t else "-" for key in ("op", "per_level_loop", "torchvision")}
        x = {key: f"{ratio[key]:.1f}" if key in ratio else "-" for key in ("per_level_loop", "torchvision")}
        diff = row["max_abs_diff_vs_op"].get("per_level_loop")
        lines.append(f"{row['batch']:>5} {row['dtype']:<8} {ms['op']:>9} {ms['per_level_loop']:>9} "
                     f"{x['per_level_loop']:>8} {ms['torchvision']:>9} {x['torchvision']:>7} "
                     f"{'-' if diff is None else f'{diff:.2e}':>14}")
        lines += [f"      {impl} failed: {err}" for impl, err in row["errors"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_option(parser)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--boxes", type=int, default=1000, help="boxes per image")
    parser.add_argument("--output-size", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="CPU: timed runs per implementation")
    parser.add_argument("--rep-ms", type=int, default=200, help="CUDA: do_bench's measuring time per implementation")
    parser.add_argument("--no-torchvision", action="store_true", help="leave torchvision's MultiScaleRoIAlign out")
    add_output_options(parser)
    args = parse_args(parser, {"height": 256, "width": 320, "channels": 16, "boxes": 100, "batches": [1],
                               "repeats": 1, "rep_ms": 20})
    out = results_file(parser, args, f"roi_align_{args.device}.json")
    if args.device == "cpu":
        # Random features have no denormals, but the op's float32 weights can produce them; as in the CLI.
        torch.set_flush_denormal(True)

    rows = []
    s = args.output_size
    attrs = RoIAlignAttrs(s, SAMPLING_RATIO)
    for batch in args.batches:
        for dtype_name in args.dtypes:
            gen = torch.Generator().manual_seed(0)
            dtype = DTYPES[dtype_name]
            features = pyramid(batch, args.channels, args.height, args.width, dtype, args.device, gen)
            boxes = proposal_boxes(batch, args.boxes, args.height, args.width, gen).to(args.device, dtype)
            levels = torch.bincount(assign_levels(boxes).flatten().clamp(min=0).cpu(), minlength=4).tolist()
            impls: dict[str, Callable[[], torch.Tensor]] = {
                "op": lambda f=features, b=boxes: multiscale_roi_align(f, b, attrs),
                "per_level_loop": lambda f=features, b=boxes: multiscale_roi_align_per_level_loop(f, b, attrs),
            }
            tv = None if args.no_torchvision else torchvision_pool(features, boxes, s, (args.height, args.width))
            if tv is not None:
                impls["torchvision"] = tv
            with torch.inference_mode():
                reference = impls["op"]().float()
                row: dict[str, Any] = {"batch": batch, "dtype": dtype_name, "boxes_per_level": levels,
                                       "seconds": {}, "max_abs_diff_vs_op": {}, "errors": {}}
                for name, fn in impls.items():
                    try:
                        diff = (fn().float() - reference).abs().max().item() if name != "op" else 0.0
                        row["max_abs_diff_vs_op"][name] = diff
                        row["seconds"][name] = (time_cuda(fn, args.rep_ms) if args.device == "cuda"
                                                else time_cpu(fn, args.repeats))
                    except Exception as exc:  # one failing baseline (say torchvision's fp16) must not lose the rest
                        row["errors"][name] = f"{type(exc).__name__}: {exc}"
            median = {name: t[0] for name, t in row["seconds"].items()}
            if "op" in median:
                row["speedup_over"] = {name: t / median["op"] for name, t in median.items() if name != "op"}
            rows.append(row)
            print(f"  batch {batch} {dtype_name}: " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in median.items()),
                  file=sys.stderr)

    result = {
        "benchmark": "multi-level RoIAlign: op vs per-level loop (vs torchvision where installed)",
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "device": device_facts(args.device),
        "torch": torch.__version__,
        "features": [[args.channels, args.height >> k, args.width >> k] for k in range(2, 6)],
        "image_hw": [args.height, args.width],
        "boxes_per_image": args.boxes,
        "output_size": s,
        "sampling_ratio": SAMPLING_RATIO,
        "timing": "triton.testing.do_bench median/p20/p80" if args.device == "cuda"
        else f"perf_counter median/min/max of {args.repeats}",
        "smoke": args.smoke,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(table(result))
    print(f"wrote {out}")
    return 1 if any(row["errors"].get("op") or "op" not in row["seconds"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
