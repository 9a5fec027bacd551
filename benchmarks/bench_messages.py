"""What checking every field costs: the time to decode one message of each kind, as a stage
receives it (transport.unpack: the internal wire, a frame's pixels in a shared-memory slot), with
the run's limits, against the same with no run limits (messages.UNBOUNDED: the message's own
consistency only) and, with --against REV, against the decoder of that git revision (its
messages.py, transport.py, shm_ring.py and configs/codec.py, loaded beside this checkout's).

    python benchmarks/bench_messages.py [--against 58fa5b5] [--rounds 7] [--number 2000] [--out PATH] [--smoke]

Messages as a run of the R50 model on 1080p video makes them: a Frame (yuv420p planes in a ring
slot), a ModelInput (3 x 800 x 1344 in a slot), RawDetections and Detections of 20 instances
(K = 100; real pycocotools RLEs of blob masks), an EndOfStream; headers with the stamps and drops
they carry at that point. Rounds interleave the decoders; the figure per decoder is the fastest
round's mean (timeit), in microseconds per message. Writes messages_decode.json (see --out).

--smoke: one round of 20 decodes per decoder.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from maskstream.pipeline.runtime import transport
from maskstream.pipeline.runtime.messages import (
    Detections,
    EndOfStream,
    Frame,
    Header,
    Limits,
    ModelInput,
    RawDetections,
    StageStamp,
)
from maskstream.pipeline.runtime.shm_ring import Ring, RingReaders
from options import add_output_options, parse_args, results_file  # benchmarks/options.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("source", "decode", "preprocess", "infer", "postprocess")
FRAME_HW, INPUT_HW, K, N = (1080, 1920), (800, 1344), 100, 20
CLASS_NAMES = tuple(f"class{i}" for i in range(91))


def header(stamps: int) -> Header:
    t = time.monotonic() - 1.0
    return Header("cam0", 1234, 49.36, tuple(StageStamp(s, t, t + 0.01) for s in STAGES[:stamps]),
                  (("source", 0), ("decode", 3)))


def boxes(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    x0, y0 = rng.random(N) * w / 2, rng.random(N) * h / 2
    return np.stack([x0, y0, x0 + rng.random(N) * w / 2, y0 + rng.random(N) * h / 2], axis=1).astype(np.float32)


def samples() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    frame_boxes = boxes(rng, FRAME_HW)
    crops = np.floor(frame_boxes).astype(np.int32)
    rles = []
    for x0, y0, x1, y1 in crops:  # an ellipse filling its crop: a mask's usual RLE
        ys, xs = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
        blob = (((ys - (y1 - y0) / 2) / max(1, (y1 - y0) / 2)) ** 2
                + ((xs - (x1 - x0) / 2) / max(1, (x1 - x0) / 2)) ** 2 < 1).astype(np.uint8)
        rles.append(mask_utils.encode(np.asfortranarray(blob))["counts"])
    labels = rng.integers(1, 91, N)
    return {
        "Frame": Frame(header(2), np.zeros((FRAME_HW[0] * 3 // 2, FRAME_HW[1]), np.uint8), "yuv420p"),
        "ModelInput": ModelInput(header(3), np.zeros((3, *INPUT_HW), np.uint8), (756, 1344), FRAME_HW),
        "RawDetections": RawDetections(header(4), boxes(rng, (756, 1344)), rng.random(N, np.float32), labels,
                                       rng.random((N, 28, 28), np.float32), (756, 1344), FRAME_HW),
        "Detections": Detections(header(5), FRAME_HW, frame_boxes, rng.random(N, np.float32), labels.astype(np.int32),
                                 tuple(CLASS_NAMES[i] for i in labels), crops, tuple(rles)),
        "EndOfStream": EndOfStream(header(5), ""),
    }


def load_revision(rev: str, into: Path) -> tuple[ModuleType, ModuleType]:
    """(messages, transport) of git revision `rev`, as a package of their own beside this checkout's."""
    package = into / "maskstream_at_rev"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path, name in (("configs/codec.py", "codec"), ("pipeline/runtime/shm_ring.py", "shm_ring"),
                       ("pipeline/runtime/messages.py", "messages"), ("pipeline/runtime/transport.py", "transport")):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout
        text = (text.replace("from maskstream.configs import codec", "from maskstream_at_rev import codec")
                .replace("maskstream.pipeline.runtime.messages", "maskstream_at_rev.messages")
                .replace("maskstream.pipeline.runtime.shm_ring", "maskstream_at_rev.shm_ring"))
        (package / f"{name}.py").write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("maskstream_at_rev.messages"), importlib.import_module("maskstream_at_rev.transport")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="a git revision whose decoder to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    add_output_options(parser)
    args = parse_args(parser, {"rounds": 1, "number": 20})
    out = results_file(parser, args, "messages_decode.json")
    limits = Limits(streams=("cam0",), max_frame_side=4096, input_hw=INPUT_HW, detections=K,
                    class_names=CLASS_NAMES, same_host=True)
    made = samples()
    scratch = tempfile.TemporaryDirectory()
    old = load_revision(args.against, Path(scratch.name)) if args.against else None
    ring = Ring.create(f"maskstream-bench-{os.getpid()}", 8, 3 * FRAME_HW[0] * FRAME_HW[1])
    readers = RingReaders((ring.name,))
    any_ring = RingReaders()
    old_readers = old[1].RingReaders() if old is not None else None
    results: dict[str, dict[str, float]] = {}
    try:
        for kind, message in made.items():
            kinds = (kind, "EndOfStream") if kind != "EndOfStream" else ("Detections", "EndOfStream")
            wire, refs = transport.pack(message, ring)
            wire = [bytes(f) for f in wire]
            run_limits = dataclasses.replace(limits, kinds=kinds)

            def checked(wire: list[bytes] = wire, run_limits: Limits = run_limits) -> None:
                transport.unpack(wire, readers, run_limits)

            def unbounded(wire: list[bytes] = wire) -> None:
                transport.unpack(wire, any_ring)

            def at_rev(wire: list[bytes] = wire) -> None:
                assert old is not None
                old[1].unpack(wire, old_readers)

            decoders = {"run_limits": checked, "unbounded": unbounded}
            if old is not None:
                decoders[f"at_{args.against}"] = at_rev
            best = {name: float("inf") for name in decoders}
            for _ in range(args.rounds):
                for name, decoder in decoders.items():
                    seconds = timeit.timeit(decoder, number=args.number) / args.number
                    best[name] = min(best[name], seconds)
            results[kind] = {name: round(s * 1e6, 2) for name, s in best.items()}
            results[kind]["in_ring"] = bool(refs)
            print(f"{kind:14s} " + "  ".join(f"{name} {us:7.1f} us" for name, us in results[kind].items()
                                             if name != "in_ring"))
            for ref in refs:
                ring.release(ref)
    finally:
        readers.close()
        any_ring.close()
        if old_readers is not None:
            old_readers.close()
        ring.close(unlink=True)
    report = {"per_message_us": results, "rounds": args.rounds, "number": args.number, "against": args.against,
              "loadavg": os.getloadavg(), "python": platform.python_version(), "machine": platform.machine(),
              "command": "python " + shlex.join(sys.argv), "smoke": args.smoke}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
