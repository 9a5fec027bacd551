"""Cost of one hop of a 1080p RGB frame (1920x1080x3 uint8) between two processes:
the bytes through a ZeroMQ ipc socket vs the shared-memory ring with ZeroMQ carrying the
descriptor, measured side by side in one run (interleaved rounds, median per message).

    python benchmarks/bench_transport.py [--messages 200] [--rounds 3]

A hop is: the producer encodes and sends a `Frame`, the consumer receives, decodes it (for
the ring: maps the slot, zero copy), touches the pixels (a sum over one row, so the data is
really read) and releases it. Timed from the first send to the consumer's last release;
per-message time = total / messages. Writes benchmarks/results/transport.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from pipeline.messages import Frame, Header
from pipeline.shm_ring import Ring, RingReaders
from pipeline.transport import Inbox, Outbox, pack, unpack

SHAPE = (1080, 1920, 3)
RESULTS = Path(__file__).resolve().parent / "results" / "transport.json"


def producer(endpoint: str, ring_name: str | None, messages: int) -> None:
    out = Outbox((endpoint,), hwm=4)
    ring = Ring.attach(ring_name) if ring_name else None
    image = np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)
    for seq in range(messages):
        frames, _ = pack(Frame(Header("bench", seq), image), ring, wait_s=None)
        out.send(frames, block=True)
    time.sleep(30)  # stay until terminated: a leaving sender loses what is unread (see transport)


def consume(inbox: Inbox, messages: int) -> float:
    readers = RingReaders()
    start = None
    for _ in range(messages):
        frames = inbox.recv(30.0)
        assert frames is not None, "producer stopped sending"
        start = start or time.perf_counter()
        received = unpack(frames, readers)
        int(received.message.image[540].sum())  # type: ignore[union-attr]
        received.release()
        del received  # its arrays point into the ring: gone before the ring is unmapped
    readers.close()
    assert start is not None
    return time.perf_counter() - start


def one_round(mode: str, messages: int, directory: str) -> float:
    endpoint = f"ipc://{directory}/{mode}"
    inbox = Inbox(endpoint, hwm=4)
    ring = Ring.create(f"msk-bench-{os.getpid()}-{mode}", 8, int(np.prod(SHAPE))) if mode == "ring" else None
    process = mp.get_context("spawn").Process(target=producer, args=(endpoint, ring.name if ring else None, messages))
    process.start()
    try:
        # The first message is a warm-up (process start, page faults of fresh slots): not timed.
        seconds = consume(inbox, messages)
    finally:
        process.terminate()
        process.join()
        inbox.close()
        if ring is not None:
            ring.close(unlink=True)
    return seconds / (messages - 1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"zmq_bytes": [], "ring": []}
    with tempfile.TemporaryDirectory(prefix="msk-bench-") as directory:
        for _ in range(args.rounds):
            for mode in times:  # interleaved, so drift in the host's load hits both alike
                times[mode].append(one_round(mode, args.messages, directory))
    median = {mode: statistics.median(values) for mode, values in times.items()}
    result = {
        "what": "one inter-process hop of a 1920x1080x3 uint8 Frame (encode, send, receive, decode, read a row, "
                "release), ms per message, median over rounds",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "messages_per_round": args.messages,
        "rounds_ms": times,
        "median_ms": median,
        "ring_over_bytes": median["ring"] / median["zmq_bytes"],
        "goal_ms": 0.3,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<12} {'ms/hop (median)':>16} {'rounds':>30}")
    for mode, values in times.items():
        print(f"{mode:<12} {median[mode]:>16.3f} {', '.join(f'{v:.3f}' for v in values):>30}")
    print(f"ring / bytes = {result['ring_over_bytes']:.3f}; goal for the ring: <= 0.3 ms per hop; wrote {RESULTS}")


if __name__ == "__main__":
    main()
