"""Cost of moving one decoded 1080p frame (1920x1080) from the decode process to the
preprocess process, three ways, measured side by side in one run (interleaved rounds,
median per message):

- zmq_bytes:     RGB (FFmpeg's swscale into a fresh array), 6.2 MB inline through a ZeroMQ
                 ipc socket;
- ring_copy:     the same RGB copied into a shared-memory ring slot, ZeroMQ carries the
                 descriptor (this pipeline before: convert, then copy into the slot);
- ring_in_place: the decoder's yuv420p planes (3.1 MB) written straight into a claimed slot
                 and sent by reference, nothing converted or copied again (the decode stage
                 now: pipeline.runtime.stage.OutputBuffers + pipeline.media.pixels.frame_pixels).

    python benchmarks/bench_transport.py [--messages 200] [--rounds 3] [--out PATH] [--smoke]

Per message the producer prepares the pixels from a decoded yuv420p frame, encodes and sends
a `Frame`; the consumer receives, decodes it (ring: maps the slot, zero copy), touches the
pixels (a sum over one row, so the data is really read) and releases it. The first message
is a warm-up.

Figures, per message, CPU time (the host is shared, its load average is recorded; and a
pipelined pair's wall time shows only its slower side):
- prepare_ms: making the pixels (swscale RGB, or copying the planes), timed alone;
- hop_ms: the hop itself: the producer's process CPU time (ZeroMQ's I/O thread included)
  minus prepare_ms, plus the consumer's process CPU time;
- preprocess_ms: what preprocess then does with that frame (resize to 320x576 and convert);
- total_ms = prepare + hop + preprocess: decode's output to the model's input.
wall_ms is the consumer's wall time per message. Writes transport.json (see --out). --smoke: 5
messages per mode, one round.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import av
import cv2
import numpy as np
import zmq
from maskstream.pipeline.media.pixels import RGB24, frame_pixels
from maskstream.pipeline.runtime.messages import Frame, Header
from maskstream.pipeline.runtime.shm_ring import Ring, RingReaders
from maskstream.pipeline.runtime.stage import OutputBuffers
from maskstream.pipeline.runtime.transport import Inbox, Outbox, pack, unpack
from maskstream.pipeline.stages.preprocess import fit_to_input
from options import add_output_options, parse_args, results_file  # benchmarks/, beside this script

SHAPE = (1080, 1920, 3)
MODES = ("zmq_bytes", "ring_copy", "ring_in_place")


def decoded_frame() -> av.VideoFrame:
    """A 1080p yuv420p frame, as an H.264 decoder gives it."""
    ys, xs = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    noise = np.random.default_rng(0).integers(0, 64, SHAPE[:2])
    rgb = np.stack([(xs + noise) % 256, (ys + noise) % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")


def prepare(mode: str, frame: av.VideoFrame, buffers: OutputBuffers) -> tuple[np.ndarray, str]:
    if mode == "ring_in_place":
        return frame_pixels(frame, lambda shape: buffers.array(shape, wait=True))
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24")), RGB24


def prepare_in_every_slot(frame: av.VideoFrame, ring: Ring) -> None:
    """In place, into each slot in turn as the loop does: 8 slots are more than the caches hold."""
    for _ in range(ring.slots):
        frame_pixels(frame, lambda shape: np.frombuffer(ring.claim(int(np.prod(shape)), timeout_s=0),
                                                         dtype=np.uint8).reshape(shape))
    ring.release_claims()


def cpu_ms(step: Callable[[], object], repeats: int = 30) -> float:
    step()  # first touch of fresh memory is not what we measure
    start = time.process_time()
    for _ in range(repeats):
        step()
    return (time.process_time() - start) / repeats * 1000


def producer(mode: str, endpoint: str, ring_name: str | None, messages: int, report: Connection) -> None:
    cv2.setNumThreads(1)  # as in a stage process
    out = Outbox((endpoint,), hwm=4)
    ring = Ring.attach(ring_name) if ring_name else None
    buffers = OutputBuffers(ring)
    frame = decoded_frame()
    if mode == "ring_in_place":
        assert ring is not None
        prepare_ms = cpu_ms(lambda: prepare_in_every_slot(frame, ring)) / ring.slots
    else:
        prepare_ms = cpu_ms(lambda: prepare(mode, frame, buffers))
    cpu_start = 0.0
    for seq in range(messages):
        if seq == 1:  # after the warm-up message
            cpu_start = time.process_time()
        image, pixel_format = prepare(mode, frame, buffers)
        frames, _ = pack(Frame(Header("bench", seq), image, pixel_format), ring, wait_s=None)
        out.send(frames, block=True)
    report.send(((time.process_time() - cpu_start) * 1000 / (messages - 1), prepare_ms))
    time.sleep(30)  # stay until terminated: a leaving sender loses what is unread (see transport)


def consume(inbox: Inbox, messages: int) -> tuple[float, float, Frame | None]:
    """(wall s, CPU s) from the end of the warm-up message to the last release, and a copy of a frame."""
    readers = RingReaders()
    wall = cpu = 0.0
    sample = None
    for seq in range(messages):
        frames = inbox.recv(60.0)
        assert frames is not None, "producer stopped sending"
        received = unpack(frames, readers)
        message = received.message
        assert isinstance(message, Frame)
        int(message.image[540].sum())
        if seq == 0:
            sample = Frame(message.header, message.image.copy(), message.pixel_format)
        received.release()
        del received, message  # their arrays point into the ring: gone before the ring is unmapped
        if seq == 0:
            wall, cpu = time.perf_counter(), time.process_time()
    readers.close()
    return time.perf_counter() - wall, time.process_time() - cpu, sample


def one_round(mode: str, messages: int, directory: str) -> dict[str, float]:
    endpoint = f"ipc://{directory}/{mode}"
    inbox = Inbox(endpoint, hwm=4)
    ring = Ring.create(f"msk-bench-{os.getpid()}-{mode}", 8, int(np.prod(SHAPE))) if mode != "zmq_bytes" else None
    receive, send = mp.get_context("spawn").Pipe(duplex=False)
    process = mp.get_context("spawn").Process(
        target=producer, args=(mode, endpoint, ring.name if ring else None, messages, send))
    process.start()
    try:
        wall, consumer_cpu, sample = consume(inbox, messages)
        producer_cpu_ms, prepare_ms = receive.recv()
    finally:
        process.terminate()
        process.join()
        inbox.close()
        if ring is not None:
            ring.close(unlink=True)
    assert sample is not None
    preprocess_ms = cpu_ms(lambda: fit_to_input(sample.image, (320, 576), (124, 116, 104), sample.pixel_format))
    per = 1000 / (messages - 1)
    hop_ms = producer_cpu_ms - prepare_ms + consumer_cpu * per
    return {"prepare_ms": prepare_ms, "hop_ms": hop_ms, "preprocess_ms": preprocess_ms,
            "total_ms": prepare_ms + hop_ms + preprocess_ms, "wall_ms": wall * per,
            "producer_cpu_ms": producer_cpu_ms, "consumer_cpu_ms": consumer_cpu * per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    add_output_options(parser)
    args = parse_args(parser, {"messages": 5, "rounds": 1})
    if args.messages < 2:
        parser.error("--messages: at least 2 (the first is a warm-up)")
    out = results_file(parser, args, "transport.json")
    load_before = os.getloadavg()
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="msk-bench-") as directory:
        for _ in range(args.rounds):
            for mode in MODES:  # interleaved, so drift in the host's load hits every mode alike
                rounds[mode].append(one_round(mode, args.messages, directory))
    median = {mode: {key: statistics.median(r[key] for r in rounds[mode]) for key in rounds[mode][0]}
              for mode in MODES}
    hop = {mode: median[mode]["hop_ms"] for mode in MODES}
    total = {mode: median[mode]["total_ms"] for mode in MODES}
    result = {
        "what": "one decoded 1920x1080 frame from the decode process to the preprocess process, CPU ms per message: "
                "prepare (pixels made), hop (transport, both processes), preprocess (to a 320x576 model input), "
                "total; median over interleaved rounds",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                    "opencv": cv2.__version__, "pyav": av.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "messages_per_round": args.messages,
        "rounds": rounds,
        "median": median,
        "ratios": {"hop_in_place_over_bytes": hop["ring_in_place"] / hop["zmq_bytes"],
                   "hop_in_place_over_ring_copy": hop["ring_in_place"] / hop["ring_copy"],
                   "hop_ring_copy_over_bytes": hop["ring_copy"] / hop["zmq_bytes"],
                   "total_in_place_over_ring_copy": total["ring_in_place"] / total["ring_copy"],
                   "total_in_place_over_bytes": total["ring_in_place"] / total["zmq_bytes"]},
        "goal_hop_ms": 0.3,
        "command": "python " + shlex.join(sys.argv),
        "smoke": args.smoke,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"{'path':<14} {'prepare':>8} {'hop':>7} {'preproc':>8} {'total':>7} {'wall':>7}   hop per round (CPU ms)")
    for mode in MODES:
        m = median[mode]
        print(f"{mode:<14} {m['prepare_ms']:>8.3f} {m['hop_ms']:>7.3f} {m['preprocess_ms']:>8.3f} "
              f"{m['total_ms']:>7.3f} {m['wall_ms']:>7.3f}   " + ", ".join(f"{r['hop_ms']:.3f}" for r in rounds[mode]))
    ratios = result["ratios"]
    print(f"hop: in-place / bytes = {ratios['hop_in_place_over_bytes']:.3f}, in-place / copy = "
          f"{ratios['hop_in_place_over_ring_copy']:.3f} (goal <= 0.3 ms per hop); total: in-place / copy = "
          f"{ratios['total_in_place_over_ring_copy']:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
