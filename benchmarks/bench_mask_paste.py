"""Masks for the wire: today's CPU postprocess vs the masks pasted in the inference process, side by side.

- probs (infer.masks probs, today's path): the postprocess stage's work on one frame's RawDetections
  (boxes back to frame pixels, each instance's 28x28 probabilities pasted into its box in numpy,
  thresholded, box-cropped RLE);
- crops (infer.masks crops): what the inference process adds with the probabilities on --device
  (where the runner leaves them): a batch's instances pasted and thresholded there at once, their
  crops bit-packed there, only those bits copied back (pipeline.stages.infer.device_crops), per
  frame of a --batch; then the postprocess stage's work on those crops (their RLE, no paste);
- crops_host_pack: the same crops copied back a byte a pixel and packed on the host with np.packbits
  (model.mask_crops.binary_crops), the alternative to packing on the device.

And the bytes of one frame's RawDetections message on the wire (messages.encode) in each form.
Both forms give the same RLEs (pixels within one float32 step of the threshold may differ; counted).
Synthetic detections: K boxes of assorted sizes in a 1080p frame, smooth blob probabilities.

    python benchmarks/bench_mask_paste.py --device cuda [--boxes 10 50 100] [--batch 8] [--batches 4]
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
from maskstream.pipeline.bench.measure import machine
from maskstream.pipeline.runtime.messages import Detections, Header, RawDetections, encode
from maskstream.pipeline.stages.infer import device_crops
from maskstream.pipeline.stages.postprocess import PostprocessConfig, PostprocessStage, box_ratios
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


def on_device(batch: list[RawDetections], device: str) -> dict[str, torch.Tensor]:
    """A batch's outputs as the runner leaves them on its device (PendingBatch.tensors())."""
    return {"boxes": torch.from_numpy(np.stack([raw.boxes for raw in batch])).to(device),
            "mask_probs": torch.from_numpy(np.stack([raw.mask_probs for raw in batch])).to(device)}  # type: ignore


def host_packed(raw: RawDetections, outputs: dict[str, torch.Tensor], i: int) -> np.ndarray:
    """Frame i's crops copied back a byte a pixel, packed here: the alternative to packing on the device."""
    ratios = torch.from_numpy(box_ratios(raw.valid_hw, raw.frame_hw)).to(outputs["boxes"].device)
    crops = binary_crops(outputs["mask_probs"][i], outputs["boxes"][i] * ratios, raw.frame_hw)
    return np.packbits(np.concatenate([crop.reshape(-1) for crop, _ in crops]))


def wire_bytes(raw: RawDetections) -> int:
    return sum(memoryview(part).nbytes for part in encode(raw))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_option(parser)
    parser.add_argument("--boxes", type=int, nargs="+", default=[10, 50, 100], help="instances per frame")
    parser.add_argument("--batch", type=int, default=8, help="frames of an inference batch (pasted in one pass)")
    parser.add_argument("--batches", type=int, default=4, help="batches timed per row (after one untimed)")
    add_output_options(parser)
    args = parse_args(parser, {"boxes": [5], "batch": 2, "batches": 1}, argv)
    out = results_file(parser, args, f"mask_paste_{args.device}.json")
    contract = InferenceContract(1, *INPUT_HW, 100, ("bg", "thing"), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    stage = PostprocessStage(PostprocessConfig(contract))
    rows: list[dict[str, Any]] = []
    for count in args.boxes:
        batches = [[detections(count, b * args.batch + i) for i in range(args.batch)] for b in range(args.batches + 1)]
        times: dict[str, list[float]] = {"probs": [], "infer_crops": [], "post_crops": [], "host_pack": []}
        same = total = 0
        sizes: dict[str, list[int]] = {"probs": [], "crops": [], "crop_pixels": []}
        for b, batch in enumerate(batches):  # the first batch is warm-up
            outputs = on_device(batch, args.device)
            sync(args.device)
            start = time.perf_counter()
            crops = device_crops(outputs, [(raw.valid_hw, raw.frame_hw) for raw in batch], [count] * len(batch))
            sync(args.device)
            infer_s = (time.perf_counter() - start) / len(batch)
            start = time.perf_counter()
            for i, raw in enumerate(batch):
                host_packed(raw, outputs, i)
            sync(args.device)
            host_s = (time.perf_counter() - start) / len(batch)
            for raw, (crop_boxes, crop_bits) in zip(batch, crops):
                sent = RawDetections(raw.header, raw.boxes, raw.scores, raw.labels, None, raw.valid_hw, raw.frame_hw,
                                     crop_boxes, crop_bits)
                start = time.perf_counter()
                expected = stage.process(raw)
                probs_s = time.perf_counter() - start
                start = time.perf_counter()
                got = stage.process(sent)
                post_s = time.perf_counter() - start
                assert isinstance(expected, Detections) and isinstance(got, Detections)
                same += sum(a == b for a, b in zip(expected.rle_counts, got.rle_counts))
                total += count
                if b:
                    times["probs"].append(probs_s * 1e3)
                    times["post_crops"].append(post_s * 1e3)
                    sizes["probs"].append(wire_bytes(raw))
                    sizes["crops"].append(wire_bytes(sent))
                    sizes["crop_pixels"].append(int(((crop_boxes[:, 2] - crop_boxes[:, 0])
                                                     * (crop_boxes[:, 3] - crop_boxes[:, 1])).sum()))
            if b:
                times["infer_crops"].append(infer_s * 1e3)
                times["host_pack"].append(host_s * 1e3)
        medians = {name: statistics.median(values) for name, values in times.items()}
        crops_ms = medians["infer_crops"] + medians["post_crops"]
        rows.append({
            "boxes": count,
            "cpu_postprocess_ms": medians["probs"],  # probs: today's postprocess, per frame
            "device_paste_ms": medians["infer_crops"],  # crops: the inference process's added work, per frame
            "crops_postprocess_ms": medians["post_crops"],  # crops: postprocess's RLE of them, per frame
            "crops_total_ms": crops_ms,
            "host_pack_paste_ms": medians["host_pack"],  # crops copied back a byte a pixel, np.packbits
            "speedup": medians["probs"] / crops_ms,
            "postprocess_speedup": medians["probs"] / medians["post_crops"],
            "probs_message_bytes": statistics.median(sizes["probs"]),
            "crops_message_bytes": statistics.median(sizes["crops"]),
            "crop_pixels": statistics.median(sizes["crop_pixels"]),  # a byte each, unpacked
            "identical_rle_fraction": same / total,
        })
    result = {"benchmark": "bench_mask_paste", "command": "python " + shlex.join(sys.argv), "smoke": args.smoke,
              "device": args.device, "machine": machine(),
              "frame_hw": FRAME_HW, "input_hw": INPUT_HW, "batch": args.batch, "frames": args.batch * args.batches,
              "rows": rows}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"per frame of a batch of {args.batch} on {args.device}; ms except bytes")
    print(f"{'boxes':>5} {'probs: postprocess':>19} {'crops: infer':>13} {'+ postprocess':>14} {'= total':>8} "
          f"{'host pack':>10} {'probs bytes':>12} {'crops bytes':>12} {'same RLE':>9}")
    for row in rows:
        print(f"{row['boxes']:>5} {row['cpu_postprocess_ms']:>19.2f} {row['device_paste_ms']:>13.2f} "
              f"{row['crops_postprocess_ms']:>14.2f} {row['crops_total_ms']:>8.2f} {row['host_pack_paste_ms']:>10.2f} "
              f"{row['probs_message_bytes']:>12.0f} {row['crops_message_bytes']:>12.0f} "
              f"{row['identical_rle_fraction']:>9.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
