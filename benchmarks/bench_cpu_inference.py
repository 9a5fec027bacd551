"""Eager CPU inference: our inference path vs the same model run the way torchvision runs it.

  ours:        batch norms folded into the convs (model.fuse), RoIAlign as one op over all levels
  torchvision: norm layers kept, RoIAlign as MultiScaleRoIAlign's per-level Python loop

Both run in one process, interleaved, on the same image and weights, so the ratio is robust to
this machine's noise. Weights are the parity goldens' (deterministic, torchvision-initialised
scales) or, without ../shared, the model's own init. The score threshold is 0 so every image
carries the worst-case load: 1000 proposals and 100 detections through the mask head.

    python benchmarks/bench_cpu_inference.py [--variant v1] [--height 800 --width 1344] [--repeats 3] [--out PATH]

The image goes in at exactly --height x --width (the model's resize bounds set to them). Prints a
table last and writes cpu_inference.json (see --out). --smoke: the lite variant at 128x160, one repeat.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time

import maskstream.model as model
import torch
from golden_state import golden_state  # benchmarks/, beside this script
from maskstream.model.fuse import fold_batch_norms
from maskstream.model.ops.roi_align import RoIAlignAttrs, multiscale_roi_align_per_level_loop
from maskstream.model.roi_heads import SAMPLING_RATIO
from maskstream.model.synthetic import make_scene
from options import add_output_options, parse_args, results_file


def per_level_loop_pool(features, boxes, output_size):
    """torchvision's MultiScaleRoIAlign: assign levels, loop over levels in Python, scatter back."""
    pooled = multiscale_roi_align_per_level_loop(features[:4], boxes, RoIAlignAttrs(output_size, SAMPLING_RATIO))
    return pooled.flatten(0, 1)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="v1", choices=["v1", "v2", "lite"])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--repeats", type=int, default=3)
    add_output_options(parser)
    args = parse_args(parser, {"variant": "lite", "height": 128, "width": 160, "repeats": 1})
    out = results_file(parser, args, "cpu_inference.json")

    # Untrained weights drive activations into float32 denormals (measured 1.4-3x slower here);
    # flushing them is a process-wide setting, so the entry point (here, the CLI) owns it.
    torch.set_flush_denormal(True)
    state = golden_state(args.variant)
    torch.manual_seed(0)
    # Resize bounds at the frame's own sides: an 800x1344 frame goes in as it is, the goal's input.
    net = model.build(args.variant, backbone_norm="batch", checkpoint=state, min_size=min(args.height, args.width),
                      max_size=max(args.height, args.width), box_score_thresh=0.0)
    net.eval()
    folded = fold_batch_norms(net)
    scene = make_scene(0, height=args.height, width=args.width)
    image = torch.from_numpy(scene.image.copy()).permute(2, 0, 1).float() / 255

    ours_pool = net.roi_heads.pool
    net.roi_heads.pool = per_level_loop_pool

    def run(m):
        with torch.no_grad():
            return m.predict([image])[0]

    # RoIAlign alone, on this image's real features and boxes.
    with torch.no_grad():
        batch, sizes, _ = model.transform.prepare([image], None, net.cfg.transform)
        feats = net.features(batch)
        proposals, num, _ = net.rpn(feats, tuple(batch.shape[-2:]), sizes)
    n_det = len(run(folded)["boxes"])
    run(net)  # warm-up

    rows: dict[str, list[float]] = {"ours": [], "torchvision_style": [], "roi_ours": [], "roi_loop": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
        rows["ours"] += timed(lambda: run(folded), 1)
        rows["torchvision_style"] += timed(lambda: run(net), 1)
        with torch.no_grad():
            rows["roi_ours"] += timed(lambda: ours_pool(feats, proposals, 7), 1)
            rows["roi_loop"] += timed(lambda: per_level_loop_pool(feats, proposals, 7), 1)
    med = {k: statistics.median(v) for k, v in rows.items()}

    result = {
        "benchmark": "eager CPU inference, one image",
        "variant": args.variant,
        "input_hw": [args.height, args.width],
        "proposals": int(num[0]),
        "detections": n_det,
        "weights": "golden (torchvision parity)" if state is not None else "seeded init",
        "score_thresh": 0.0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "seconds": rows,
        "median_s": med,
        "ratio_torchvision_style_over_ours": med["torchvision_style"] / med["ours"],
        "roi_align_box_head_ratio_loop_over_ours": med["roi_loop"] / med["roi_ours"],
        "command": "python " + shlex.join(sys.argv),
        "smoke": args.smoke,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.variant} {args.height}x{args.width}, {int(num[0])} proposals, {n_det} detections, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (interleaved)")
    print(f"{'what':<40}{'ours s':>10}{'tv-style s':>12}{'tv/ours':>9}")
    print(f"{'full model (predict)':<40}{med['ours']:>10.3f}{med['torchvision_style']:>12.3f}"
          f"{result['ratio_torchvision_style_over_ours']:>9.2f}")
    print(f"{'box RoIAlign (1000 boxes, 7x7)':<40}{med['roi_ours']:>10.3f}{med['roi_loop']:>12.3f}"
          f"{result['roi_align_box_head_ratio_loop_over_ours']:>9.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
