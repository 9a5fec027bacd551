"""Masks for the wire: today's CPU postprocess vs the paste on the device, side by side.

- cpu_postprocess: the postprocess stage's work on one frame's RawDetections (boxes back to frame
  pixels, each instance's 28x28 probabilities pasted into its box in numpy, thresholded,
  box-cropped RLE), as the postprocess processes do it today;
- device_paste: the same frame's masks with the probabilities on --device (where the runner
  leaves them): every instance pasted and thresholded there at once (model.mask_crops), only the
  crops' bytes copied back, then the same RLE of each crop on the CPU.

Both give the same RLEs (pixels within one float32 step of the threshold may differ; counted).
Synthetic detections: K boxes of assorted sizes in a 1080p frame, smooth blob probabilities.

    python benchmarks/bench_mask_paste.py --device cuda [--boxes 10 50 100] [--frames 30]
    python benchmarks/bench_mask_paste.py --smoke
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from maskstream.model.contract import InferenceContract
from maskstream.model.mask_crops import binary_crops
from maskstream.model.rle import encode_crop_rle
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.runtime.messages import Header, RawDetections
from maskstream.pipeline.stages.postprocess import PostprocessConfig, PostprocessStage, rescale_boxes
from options import add_device_option, add_output_options, parse_args, results_file  # beside this script

INPUT_HW, FRAME_HW = (800, 1344), (1080, 1920)


def detections(count: int, seed: int) -> RawDetections:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:28, 0:28] / 27.0
    centres = rng.uniform(0.3, 0.7, (count, 2))
    spread = rng.uniform(0.15, 0.35, (count, 1, 1))
    probs = np.exp(-((xs - centres[:, 0, None, None]) ** 2 + (ys - centres[:, 1, None, None]) ** 2)
                   / (2 * spread**2)).astype(np.float32)  # [K, 28, 28]
    side = rng.uniform(20, 500, (count, 2))
    x0 = rng.uniform(0, INPUT_HW[1] - 20, count)
    y0 = rng.uniform(0, INPUT_HW[0] - 20, count)
    boxes = np.stack([x0, y0, np.minimum(x0 + side[:, 0], INPUT_HW[1]), np.minimum(y0 + side[:, 1], INPUT_HW[0])],
                     axis=1).astype(np.float32)
    return RawDetections(Header("bench", seed), boxes, np.full(count, 0.9, np.float32), np.ones(count, np.int64),
                         probs, INPUT_HW, FRAME_HW)


def device_paste(raw: RawDetections, probs: torch.Tensor, boxes: torch.Tensor) -> list[bytes]:
    """What the inference process would do with masks left on the device: RLE counts per instance."""
    # the postprocess stage's float32 ratios (model input -> frame pixels), applied on the device
    ratios = torch.from_numpy(rescale_boxes(np.ones((1, 4), np.float32), raw.valid_hw, raw.frame_hw)[0])
    frame_boxes = boxes * ratios.to(boxes.device)
    return [encode_crop_rle(crop, origin)[0]["counts"].encode("ascii")
            for crop, origin in binary_crops(probs, frame_boxes, raw.frame_hw)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_option(parser)
    parser.add_argument("--boxes", type=int, nargs="+", default=[10, 50, 100], help="instances per frame")
    parser.add_argument("--frames", type=int, default=30, help="frames timed per row (after one untimed)")
    add_output_options(parser)
    args = parse_args(parser, {"boxes": [5], "frames": 2}, argv)
    out = results_file(parser, args, f"mask_paste_{args.device}.json")
    contract = InferenceContract(1, *INPUT_HW, 100, ("bg", "thing"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    stage = PostprocessStage(PostprocessConfig(contract))
    rows: list[dict[str, Any]] = []
    for count in args.boxes:
        frames = [detections(count, seed) for seed in range(args.frames + 1)]
        on_device = [(torch.from_numpy(f.mask_probs).to(args.device), torch.from_numpy(f.boxes).to(args.device))
                     for f in frames]
        cpu_ms, device_ms, same = [], [], 0
        for i, raw in enumerate(frames):
            start = time.perf_counter()
            expected = stage.process(raw).rle_counts  # type: ignore[union-attr]
            cpu = time.perf_counter() - start
            start = time.perf_counter()
            got = device_paste(raw, *on_device[i])
            if args.device == "cuda":
                torch.cuda.synchronize()
            dev = time.perf_counter() - start
            same += sum(a == b for a, b in zip(expected, got))
            if i:  # the first frame of a row is warm-up
                cpu_ms.append(cpu * 1e3)
                device_ms.append(dev * 1e3)
        rows.append({"boxes": count, "cpu_postprocess_ms": statistics.median(cpu_ms),
                     "device_paste_ms": statistics.median(device_ms),
                     "speedup": statistics.median(cpu_ms) / statistics.median(device_ms),
                     "identical_rle_fraction": same / (count * len(frames))})
    result = {"benchmark": "bench_mask_paste", "command": "python " + shlex.join(sys.argv), "smoke": args.smoke,
              "device": args.device, "machine": machine(),
              "frame_hw": FRAME_HW, "input_hw": INPUT_HW, "frames": args.frames, "rows": rows}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'boxes':>5} {'cpu postprocess ms':>19} {'device paste ms':>16} {'speedup':>8} {'same RLE':>9}")
    for row in rows:
        print(f"{row['boxes']:>5} {row['cpu_postprocess_ms']:>19.2f} {row['device_paste_ms']:>16.2f} "
              f"{row['speedup']:>8.2f} {row['identical_rle_fraction']:>9.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
