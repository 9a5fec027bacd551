"""A structured fuzz test of the internal sockets during a real run on a real video, offline.

10,000 mutated messages, made from a valid message of each kind a socket takes (inline and by
ring reference) by mutating every field (each leaf of the header, in turn, to hostile values),
keys, array shapes, dtypes and buffer references, buffer sizes and values, slot tables (ring
names, slots, generations, sizes), whole frames (truncated, cut, corrupted, extra, missing), the
topic, the kind (a valid message of another kind), and what the run's limits bound (streams,
valid_hw, frame_hw, K, labels, class names), go to the inboxes of preprocess, inference,
postprocess and publish at a steady pace (in step with the run's progress) while the run goes;
frames declaring sizes beyond a socket's ZMQ_MAXMSGSIZE go over raw ZMTP connections besides.
Each mutant is checked to be refused by the run's own checks before it is sent (the few that a
mutation leaves valid are not hostile input, and are not sent), so the run must count exactly the
number sent as malformed.

The run must then end as a clean run of the same input does: exit 0, no stage restarted, no error
but malformed messages, and its JSONL (timestamps aside) and COCO results equal to the clean run's.
"""
from __future__ import annotations

import collections
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import zmq
from maskstream.model.runners import RunnerSpec, runner_choice
from maskstream.pipeline.cli.main import build_parser
from maskstream.pipeline.cli.run import run_config
from maskstream.pipeline.run_config import (
    inference_contract,
    masks_in_infer,
    message_limits,
    model_config,
    stream_ids,
)
from maskstream.pipeline.runtime.messages import (
    Detections,
    EndOfStream,
    Frame,
    Header,
    Limits,
    MessageError,
    ModelInput,
    RawDetections,
    StageStamp,
    encode,
)
from maskstream.pipeline.runtime.shm_ring import RingReaders
from maskstream.pipeline.runtime.transport import unpack

from tests.pipeline_runs import ROOT, TINY_MODEL_SETS
from tests.raw_zmtp import dropped, zmtp_push
from tests.shared_data import DATA, require

pytestmark = pytest.mark.slow

MESSAGES = 10_000
FRAMES = 300  # of the video: the run lasts long enough for the messages at a steady pace
SEED = 14
# The mutants are all sent by the time this share of the run's frames is published.
SENT_BY = 0.8
RAW_OVERSIZED = 3  # per socket: frames declared larger than its ZMQ_MAXMSGSIZE, each on its own connection
INBOXES = {"preprocess-0": "Frame", "infer": "ModelInput", "postprocess-0": "RawDetections", "publish": "Detections"}


# Postprocess takes one form of RawDetections' masks per run (infer.masks): a run of each, so that
# both forms' every field is fuzzed (the other form's template is refused as such, as any mutant).
@pytest.mark.parametrize("masks", ["probs", "crops"])
def test_ten_thousand_mutated_messages_to_every_stage_leave_the_run_as_a_clean_one(tmp_path, masks):
    video = require(DATA / "videos" / "car-detection.mp4")
    sets = (*TINY_MODEL_SETS, f"source.max_frames={FRAMES}", f"infer.masks={masks}")
    args = ["--source", str(video), "--workers", "1", *[x for s in sets for x in ("--set", s)]]
    clean = _run(args, tmp_path / "clean")
    try:
        code, stdout, stderr = clean.wait()
    finally:
        clean.kill()
    assert code == 0, stderr
    assert "malformed" not in stdout and "restarted" not in stdout

    limits = _run_limits(args)
    fuzzed = _run(args, tmp_path / "fuzzed")
    try:
        folder = fuzzed.endpoint_folder()
        rings = fuzzed.rings()
        mutants = Mutants(limits, rings, random.Random(SEED))
        with _Senders(folder) as senders:  # open until the run ends: a receiver drops what it has not
            stats = _send(mutants, senders, fuzzed, limits)  # read yet from a sender that disconnects
            code, stdout, stderr = fuzzed.wait()
    finally:
        fuzzed.kill()
    # each stage logs a malformed message, or at most 10 a window and how many it left out: per socket,
    # every mutant sent was received and refused
    logged: collections.Counter[str] = collections.Counter()
    for line in stderr.splitlines():
        found = re.search(r"(\w+)\.0: (?:malformed message on|(\d+) more malformed messages)", line)
        if found and "last error:" not in line:
            logged[found.group(1)] += int(found.group(2) or 1)
    print(f"sent by socket {dict(stats.sockets)}, malformed logged by stage {dict(logged)}")
    assert code == 0, stderr[-5000:]
    assert "restarted" not in stdout, stdout
    assert f"{MESSAGES} malformed message(s) ignored" in stdout, stdout
    assert {endpoint: logged[endpoint.split("-")[0]] for endpoint in INBOXES} == stats.sockets
    last_errors = [line for line in stderr.splitlines() if line.strip().startswith("last error:")]
    assert last_errors and all("malformed message on ipc://" in line for line in last_errors), last_errors
    for endpoint in INBOXES:  # every stage's log says which socket and why
        assert re.search(rf"malformed message on ipc://\S+/{endpoint}: \w", stderr), endpoint
    assert _without_stamps(fuzzed.jsonl) == _without_stamps(clean.jsonl)
    assert json.loads(fuzzed.coco.read_text()) == json.loads(clean.coco.read_text())
    assert stats.raw_dropped == RAW_OVERSIZED * len(INBOXES)
    # structured: every mutation class, and every header field, was sent many times
    assert all(n >= 100 for n in stats.sockets.values()) and len(stats.sockets) == len(INBOXES), stats.sockets
    assert all(n >= 100 for n in stats.classes.values()) and set(stats.classes) == set(Mutants.CLASSES), stats.classes
    assert set(stats.leaves) == mutants.all_leaves, mutants.all_leaves - set(stats.leaves)
    print(f"fuzz: {MESSAGES} sent in {stats.seconds:.1f} s ({stats.skipped_valid} mutants left valid, not sent); "
          f"by socket {dict(stats.sockets)}; by class {dict(stats.classes)}")


# ---------------------------------------------------------------------------- the runs


class _Run:
    def __init__(self, args: list[str], folder: Path):
        folder.mkdir()
        self.folder, self.jsonl, self.coco = folder, folder / "r.jsonl", folder / "r.json"
        # short: an ipc path has at most 107 characters
        self._endpoints = tempfile.TemporaryDirectory(prefix="fuzz-", dir="/tmp")
        self.endpoints = Path(self._endpoints.name)
        self.stderr_path = folder / "stderr.txt"
        cmd = [sys.executable, "-m", "maskstream.pipeline.cli", "run", "--quiet", "--out-dir", str(folder / "out"),
               *args, "--out", str(self.jsonl), "--coco", str(self.coco),
               "--set", f"transport.endpoint_dir={self.endpoints}"]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)

    def wait(self, timeout_s: float = 600) -> tuple[int, str, str]:
        stdout, _ = self.process.communicate(timeout=timeout_s)
        return self.process.returncode, stdout, self.stderr_path.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._endpoints.cleanup()

    def published(self) -> int:
        if not self.jsonl.exists():
            return 0
        return self.jsonl.read_bytes().count(b"\n")

    def endpoint_folder(self, timeout_s: float = 120) -> Path:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [p for p in self.endpoints.iterdir() if p.name.startswith("maskstream-")]
            if found and (found[0] / "publish").exists():
                return found[0]
            assert time.monotonic() < deadline and self.process.poll() is None, "the run never bound its sockets"
            time.sleep(0.1)

    def rings(self) -> dict[str, str]:
        """The run's rings by what they carry: "decode" (frames), "preprocess" (model inputs)."""
        found = {}
        for name in os.listdir("/dev/shm"):
            if name.startswith(f"maskstream-{self.process.pid}-"):
                found[name.rsplit("-", 2)[-2]] = name
        assert set(found) == {"decode", "preprocess"}, found
        return found


def _without_stamps(path: Path) -> list[dict[str, Any]]:
    """JSONL lines without their timestamps, which differ between runs."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("stamps")
    return lines


def _run(args: list[str], folder: Path) -> _Run:
    return _Run(args, folder)


def _run_limits(args: list[str]) -> Limits:
    """The run's message limits, made from the same command line as the run makes them."""
    cfg = run_config(build_parser().parse_args(["run", *args]))
    model_cfg, _ = model_config(cfg.model)
    limits = message_limits(cfg, inference_contract(cfg.model, model_cfg), stream_ids(cfg.sources))
    crops = masks_in_infer(cfg.infer.masks, runner_choice(RunnerSpec(engine=cfg.model.engine, device=cfg.model.device)))
    return replace(limits, raw_masks="crops" if crops else "probs")


# ---------------------------------------------------------------------------- sending


@dataclass
class Stats:
    seconds: float = 0.0
    raw_dropped: int = 0
    skipped_valid: int = 0
    classes: collections.Counter[str] = None  # type: ignore[assignment]
    sockets: collections.Counter[str] = None  # type: ignore[assignment]
    leaves: collections.Counter[str] = None  # type: ignore[assignment]


class _Senders:
    """A PUSH socket connected to each stage's inbox."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        for endpoint in INBOXES:
            push = self.context.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 8)
            push.connect(f"ipc://{folder / endpoint}")
            self.sockets[endpoint] = push
            self.poller.register(push, zmq.POLLOUT)

    def __enter__(self) -> _Senders:
        return self

    def __exit__(self, *exc: object) -> None:
        for push in self.sockets.values():
            push.close(linger=0)
        self.context.term()


def _send(mutants: Mutants, senders: _Senders, run: _Run, limits: Limits) -> Stats:
    """MESSAGES mutants to the sockets, paced by the run's progress (all sent by the time SENT_BY of
    its frames are published), each socket as fast as it takes them: inference, the pipeline's
    slowest stage, always has a frame waiting, and ZeroMQ takes its inbox's senders in turn, so it
    (and preprocess, which waits for it) takes about one mutant per frame; the others take the rest.
    Raw oversized frames first, each on its own connection (ZeroMQ hangs up on them)."""
    stats = Stats(skipped_valid=0, classes=collections.Counter(), sockets=collections.Counter(),
                  leaves=mutants.leaves)
    deadline = time.monotonic() + 300
    while run.published() < 1:  # inference is up and frames flow
        assert time.monotonic() < deadline and run.process.poll() is None, "the run published nothing"
        time.sleep(0.1)
    for endpoint, kind in INBOXES.items():
        socket_limit = replace(limits, kinds=(kind, "EndOfStream")).max_part_bytes()
        assert socket_limit is not None
        for declared in (socket_limit + 1, 1 << 30, 1 << 40)[:RAW_OVERSIZED]:
            peer = zmtp_push(str(senders.folder / endpoint), declared, bytes(4096))
            stats.raw_dropped += dropped(peer, within_s=10.0)
            peer.close()
    waiting = {endpoint: mutants.next(endpoint) for endpoint in INBOXES}
    start, sent = time.monotonic(), 0
    while sent < MESSAGES:
        assert run.process.poll() is None, f"the run ended with {sent} of {MESSAGES} sent: {stats.sockets}"
        assert time.monotonic() < deadline, f"only {sent} of {MESSAGES} sent in time: {stats.sockets}"
        due = min(MESSAGES, max(20, int(run.published() / (SENT_BY * FRAMES) * MESSAGES)))
        while sent < due:
            for endpoint in INBOXES:
                label, frames = waiting[endpoint]
                if sent < due and _send_one(senders.sockets[endpoint], frames):
                    stats.classes[label] += 1
                    stats.sockets[endpoint] += 1
                    sent += 1
                    waiting[endpoint] = mutants.next(endpoint)
            if sent < due and not senders.poller.poll(20):  # every stage busy
                break
        time.sleep(0.02)
    stats.seconds = time.monotonic() - start
    stats.skipped_valid = mutants.skipped_valid
    return stats


def _send_one(push: zmq.Socket, frames: list[bytes]) -> bool:
    try:
        push.send_multipart(frames, flags=zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


# ---------------------------------------------------------------------------- the mutants


HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 7, 2**31, 2**53, 2**62, 2**63 - 1, -(2**63), 2**64 - 1, 0.5, -0.0, 1e308, -1e308,
    math.nan, math.inf, -math.inf, "", "x", "a/b", "x" * 300, "../../etc/passwd", "\x00",
    b"", b"\xff" * 8, [], [0], [0, 0], [-1, 5], [1, 2, 3], [2**62, 4], {}, {"nd": 0}, {"a": 1}, [[None]],
]
DTYPES: list[Any] = ["V0", "V8", "O", "<U4", "(2,)<f4", ">f4", "<f8", "<f2", "|b1", "<i2", "S0", "M8[s]", "<c8",
                     "|u1", "<i4", "<i8", "<f4", "", None, 7, ["<f4"]]
DIMENSIONS = [0, 1, 2, 3, 27, 29, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1, -1, -(2**63)]
RING_NAMES = ["a/b", "", "x" * 300, "maskstream-1-abcdef-decode-0", "/dev/shm/maskstream", "..", "\x00"]


class Mutants:
    """Mutated messages for each socket, each one that socket's checks refuse."""

    CLASSES = ("field", "key", "shape", "dtype", "buffer-ref", "buffer-size", "buffer-values", "frames",
               "header-bytes", "topic", "slot-table", "limits", "kind")

    def __init__(self, limits: Limits, rings: dict[str, str], rng: random.Random):
        self.limits, self.rings, self.rng = limits, rings, rng
        self.skipped_valid = 0
        self.leaves: collections.Counter[str] = collections.Counter()
        self.templates = {endpoint: self._templates(kind) for endpoint, kind in INBOXES.items()}
        self.socket_limits = {endpoint: replace(limits, kinds=(kind, "EndOfStream")) for endpoint, kind in
                              INBOXES.items()}
        self._operators: dict[str, Callable[[Parts, str], str | None]] = {
            "field": self._field, "key": self._key, "shape": self._shape, "dtype": self._dtype,
            "buffer-ref": self._buffer_ref, "buffer-size": self._buffer_size, "buffer-values": self._buffer_values,
            "frames": self._frames, "header-bytes": self._header_bytes, "topic": self._topic,
            "slot-table": self._slot_table, "limits": self._limits, "kind": self._kind,
        }
        self._turns: collections.Counter[str] = collections.Counter()
        self._field_turns: collections.Counter[str] = collections.Counter()
        self._leaf_cycle: dict[str, Iterator[tuple[Any, ...]]] = {}
        self._retry: dict[str, tuple[Any, ...]] = {}
        self._name = ""
        self._last_leaf: tuple[str, tuple[Any, ...]] = ("", ())
        self.all_leaves = {f"{endpoint}:{name}:{'.'.join(map(str, path))}"
                           for endpoint, templates in self.templates.items()
                           for name, frames in templates for path in _leaves(Parts.of(frames).meta["fields"])}

    def next(self, endpoint: str) -> tuple[str, list[bytes]]:
        """(mutation class, frames) of the next mutant for `endpoint`'s socket, one its checks refuse."""
        while True:
            turn = self._turns[endpoint]
            self._turns[endpoint] += 1
            # every other one mutates a field (each template's leaves in turn), so that a socket that
            # takes few messages still gets every field of its messages
            label = "field" if turn % 2 == 0 else self.CLASSES[1 + (turn // 2) % (len(self.CLASSES) - 1)]
            for _attempt in range(10):
                if label == "field":
                    self._field_turns[endpoint] += 1
                    templates = self.templates[endpoint]
                    name, template = templates[self._field_turns[endpoint] % len(templates)]
                else:
                    name, template = self.rng.choice(self.templates[endpoint])
                parts = Parts.of(template)
                self._name = name
                leaf = self._operators[label](parts, endpoint)
                if leaf is not None:
                    break
            else:
                continue  # nothing of that class applies to this socket's messages
            frames = parts.frames()
            if max((len(f) for f in frames), default=0) > 1 << 20:
                continue  # a frame over a socket's limit drops the connection: the raw ones test that
            try:
                received = unpack(frames, RingReaders(()), self.socket_limits[endpoint])
            except MessageError:
                if label == "field":
                    self.leaves[f"{endpoint}:{name}:{leaf}"] += 1
                return label, frames
            received.release()
            self.skipped_valid += 1
            if label == "field":
                self._retry[self._last_leaf[0]] = self._last_leaf[1]

    # ------------------------------------------------------------------ templates

    def _header(self, seq: int) -> Header:
        # stamps from long before the run: a frame of no decoder's current life
        return Header(self.limits.streams[0], seq, seq / 25, (StageStamp("source", 1.0, 1.0),
                                                              StageStamp("decode", 1.0, 1.001)),
                      (("source", 0), ("decode", 0)))

    def _templates(self, kind: str) -> list[tuple[str, list[bytes]]]:
        h, w = self.limits.input_hw or (128, 160)
        k, names = self.limits.detections or 5, self.limits.class_names
        seq = self.rng.randrange(FRAMES)
        rng = np.random.default_rng(seq)
        made: list[tuple[str, list[bytes]]] = [("EndOfStream", _wire(EndOfStream(self._header(FRAMES), "")))]
        if kind == "Frame":
            made.append(("Frame", _wire(Frame(self._header(seq), rng.integers(0, 256, (120, 160, 3), np.uint8)))))
            made.append(("yuv", _wire(Frame(self._header(seq), rng.integers(0, 256, (180, 160), np.uint8),
                                            "yuv420p"))))
            made.append(("Frame-ring", _in_slot(Frame(self._header(seq), np.zeros((432, 768), np.uint8), "yuv420p"),
                                                 self.rings["decode"], self.rng)))
        elif kind == "ModelInput":
            image = rng.integers(0, 256, (3, h, w), np.uint8)
            made.append(("ModelInput", _wire(ModelInput(self._header(seq), image, (h, w - 8), (432, 768)))))
            made.append(("ModelInput-ring", _in_slot(ModelInput(self._header(seq), image, (h, w), (432, 768)),
                                                      self.rings["preprocess"], self.rng)))
        elif kind == "RawDetections":
            boxes = _boxes(rng, k, h, w)
            made.append(("RawDetections", _wire(RawDetections(
                self._header(seq), boxes, rng.random(k, np.float32), rng.integers(1, len(names), k),
                rng.random((k, 28, 28), np.float32), (h, w), (432, 768)))))
            crops = np.floor(_boxes(rng, k, 432, 768)).astype(np.int32)  # the masks as crops (infer.masks)
            made.append(("RawDetections-crops", _wire(RawDetections(
                self._header(seq), boxes, rng.random(k, np.float32), rng.integers(1, len(names), k), None,
                (h, w), (432, 768), crops, np.packbits(rng.random(_pixels(crops)) < 0.5)))))
        else:
            boxes = _boxes(rng, k, 432, 768)
            crops = np.floor(boxes).astype(np.int32)
            labels = rng.integers(1, len(names), k).astype(np.int32)
            rles = tuple(mask_utils.encode(np.asfortranarray(
                rng.integers(0, 2, (int(y1 - y0), int(x1 - x0)), np.uint8)))["counts"] for x0, y0, x1, y1 in crops)
            made.append(("Detections", _wire(Detections(
                self._header(seq), (432, 768), boxes, rng.random(k, np.float32), labels,
                tuple(names[i] for i in labels), crops, rles))))
        return made

    # ------------------------------------------------------------------ operators (None: not applicable)

    def _field(self, parts: Parts, endpoint: str) -> str | None:
        """Each leaf of the fields, in turn, set to a hostile value (a leaf whose value came out valid
        is tried again next time, so that every leaf is sent refused)."""
        key = f"{endpoint}:{self._name}"
        if key not in self._leaf_cycle:
            self._leaf_cycle[key] = _forever(list(_leaves(parts.meta["fields"])))
        path = self._retry.pop(key, None) or next(self._leaf_cycle[key])
        self._last_leaf = (key, path)
        _set(parts.meta["fields"], path, self.rng.choice(HOSTILE_VALUES))
        return ".".join(map(str, path))

    def _key(self, parts: Parts, endpoint: str) -> str | None:
        maps = list(_maps(parts.meta["fields"]))
        target = self.rng.choice(maps)
        if self.rng.random() < 0.5 and target:
            del target[self.rng.choice(list(target))]
        else:
            target[self.rng.choice(["colour", "nd ", "__class__", "", "header"])] = self.rng.choice(HOSTILE_VALUES)
        return "key"

    def _arrays(self, parts: Parts) -> list[dict[str, Any]]:
        return [m for m in _maps(parts.meta["fields"]) if m.keys() == {"nd", "dtype", "shape"}]

    def _shape(self, parts: Parts, endpoint: str) -> str | None:
        arrays = self._arrays(parts)
        if not arrays:
            return None
        ref = self.rng.choice(arrays)
        shape = list(ref["shape"])
        choice = self.rng.randrange(4)
        if choice == 0 and shape:
            shape[self.rng.randrange(len(shape))] = self.rng.choice(DIMENSIONS)
        elif choice == 1:
            shape.append(self.rng.choice(DIMENSIONS))
        elif choice == 2 and shape:
            shape.pop(self.rng.randrange(len(shape)))
        else:
            shape = self.rng.choice([[2**62, 4], [2**32, 2**32, 3], [], [0] * 9, "[1, 2]", None, {"0": 1}])
        ref["shape"] = shape
        return "shape"

    def _dtype(self, parts: Parts, endpoint: str) -> str | None:
        arrays = self._arrays(parts)
        if not arrays:
            return None
        self.rng.choice(arrays)["dtype"] = self.rng.choice(DTYPES)
        return "dtype"

    def _buffer_ref(self, parts: Parts, endpoint: str) -> str | None:
        arrays = self._arrays(parts)
        if not arrays:
            return None
        self.rng.choice(arrays)["nd"] = self.rng.choice([-1, 1, 2, 3, 4, 99, 2**63, "0", None, 0.0])
        return "buffer-ref"

    def _buffer_size(self, parts: Parts, endpoint: str) -> str | None:
        candidates = [i for i, b in enumerate(parts.buffers) if b]
        if not candidates:
            return None
        i = self.rng.choice(candidates)
        data = parts.buffers[i]
        parts.buffers[i] = self.rng.choice([b"", data[:-1], data[: len(data) // 2], data + b"\0", data + data[:4],
                                            data[:1]])
        return "buffer-size"

    def _buffer_values(self, parts: Parts, endpoint: str) -> str | None:
        """Values that break a stage: boxes and scores NaN, inf, huge or inverted; labels and crops out of range."""
        fields = parts.meta["fields"]
        editable = [name for name in ("boxes", "scores", "labels", "crop_boxes") if name in fields
                    and isinstance(fields[name], dict) and parts.buffers[fields[name]["nd"]]]
        if not editable:
            return None
        name = self.rng.choice(editable)
        ref = fields[name]
        array = np.frombuffer(parts.buffers[ref["nd"]], dtype=ref["dtype"]).copy()
        index = self.rng.randrange(len(array))
        if array.dtype.kind == "f":
            array[index] = self.rng.choice([np.nan, np.inf, -np.inf, -5.0, 1e30, 2.0, 1e9])
        else:
            array[index] = self.rng.choice([-1, -(2**31), 2**31 - 1, 10**6, 1000])
        parts.buffers[ref["nd"]] = array.tobytes()
        return "buffer-values"

    def _frames(self, parts: Parts, endpoint: str) -> str | None:
        choice = self.rng.randrange(5)
        if choice == 0:
            parts.extra = [self.rng.choice([b"", b"junk", bytes(64)]) for _ in range(self.rng.randint(1, 7))]
        elif choice == 1:
            parts.drop = self.rng.randint(1, 3 + len(parts.buffers))
        elif choice == 2 and parts.buffers:
            parts.buffers.append(parts.buffers[0])
        elif choice == 3 and len(parts.buffers) > 1:
            parts.buffers[0], parts.buffers[1] = parts.buffers[1], parts.buffers[0]
        else:
            parts.drop = len(parts.buffers) + 2  # nothing but the topic
        return "frames"

    def _header_bytes(self, parts: Parts, endpoint: str) -> str | None:
        packed = bytearray(msgpack.packb(parts.meta, use_bin_type=True))
        choice = self.rng.randrange(6)
        if choice == 0:
            packed = packed[: self.rng.randrange(len(packed))]
        elif choice == 1:
            for _ in range(self.rng.randint(1, 8)):
                packed[self.rng.randrange(len(packed))] = self.rng.randrange(256)
        elif choice == 2:
            packed = bytearray(self.rng.randbytes(self.rng.randint(0, 300)))
        elif choice == 3:
            packed = bytearray(msgpack.packb(self.rng.choice([[1, 2], 7, "Frame", None, {"v": 1}, [parts.meta]])))
        elif choice == 4:
            parts.meta["v"] = self.rng.choice([0, 2, True, "1", None, 1.0])
            packed = bytearray(msgpack.packb(parts.meta, use_bin_type=True))
        else:
            parts.meta["kind"] = self.rng.choice(["StageReport", "Message", "", "frame", 5, "Header", "LostFrame"])
            packed = bytearray(msgpack.packb(parts.meta, use_bin_type=True))
        parts.raw_header = bytes(packed)
        return "header-bytes"

    def _topic(self, parts: Parts, endpoint: str) -> str | None:
        parts.topic = self.rng.choice([b"", b"other", parts.topic + b"x", b"\xff\xfe", parts.topic[:-1], b"x" * 1000])
        return "topic"

    def _slot_table(self, parts: Parts, endpoint: str) -> str | None:
        own = self.rings["decode" if endpoint == "preprocess-0" else "preprocess"]
        others = [r for r in self.rings.values() if r != own]
        if parts.table is None:  # an inline message claiming a slot for a buffer it also carries
            if not parts.buffers:
                return None
            parts.table = {0: [own, 0, self.rng.getrandbits(62), len(parts.buffers[0])]}
            return "slot-table"
        entry = parts.table[0]
        choice = self.rng.randrange(8)
        if choice == 0:
            entry[0] = self.rng.choice([*RING_NAMES, *others])
        elif choice == 1:
            entry[1] = self.rng.choice([-1, 8, 9, 2**31, 2**63 - 1, -(2**63)])
        elif choice == 2:
            entry[2] = self.rng.choice([0, 1, -1, 2**63 - 1, self.rng.getrandbits(62)])
        elif choice == 3:
            entry[3] = self.rng.choice([0, 1, entry[3] - 1, entry[3] + 1, 2**40, 2**63 - 1, -1])
        elif choice == 4:
            parts.table = {self.rng.choice([1, 2, -1, 99, "0"]): entry}
        elif choice == 5:
            parts.table = self.rng.choice([[entry], {0: entry[:3]}, {0: [*entry, 1]}, {0: None}, {0: "x"}])
        elif choice == 6:
            parts.raw_table = self.rng.choice([b"\xc1", b"\x81\x00", self.rng.randbytes(16), b"\x93\x01\x02\x03"])
        else:
            parts.buffers[0] = bytes(entry[3] if 0 < entry[3] < 1 << 20 else 16)  # the slot's bytes inline too
        return "slot-table"

    def _limits(self, parts: Parts, endpoint: str) -> str | None:
        """Values only the run's limits refuse: another stream, valid_hw outside the input, a frame
        beyond the largest, labels and names the model has not, K + 1 instances."""
        fields = parts.meta["fields"]
        h, w = self.limits.input_hw or (128, 160)
        side = self.limits.max_frame_side or 4096
        options: list[Callable[[], None]] = [
            lambda: fields["header"].update(stream_id=self.rng.choice(["other", "car-detection2", "", "x" * 300])),
            lambda: fields["header"].update(seq=self.rng.choice([-1, 2**53, 2**63 - 1])),
        ]
        if "valid_hw" in fields:
            options.append(lambda: fields.update(valid_hw=self.rng.choice([[0, 0], [h + 1, w], [h, w + 1], [-1, 5],
                                                                           [0, w]])))
        if "frame_hw" in fields:
            options.append(lambda: fields.update(frame_hw=self.rng.choice([[0, 0], [side + 1, 10], [10, side + 1]])))
        if "class_names" in fields and fields["class_names"]:
            options.append(lambda: fields["class_names"].__setitem__(0, self.rng.choice(["", "dragon", "x" * 300])))
        if "valid_hw" in fields and "boxes" in fields:  # RawDetections
            options.append(lambda: self._more_instances(parts))
        if parts.meta["kind"] == "Frame" and parts.table is None:
            options.append(lambda: fields.update(pixel_format=self.rng.choice(["bgr24", "rgb48", "", "yuv444p"])))
        self.rng.choice(options)()
        return "limits"

    def _more_instances(self, parts: Parts) -> None:
        """K + 1 instances, every array consistent with it."""
        k = (self.limits.detections or 5) + 1
        fields = parts.meta["fields"]
        for name in ("boxes", "scores", "labels", "mask_probs", "crop_boxes"):
            ref = fields[name]
            if ref is None:  # the other form of the masks
                continue
            row = len(parts.buffers[ref["nd"]]) // max(1, ref["shape"][0])
            ref["shape"] = [k, *ref["shape"][1:]]
            parts.buffers[ref["nd"]] = (parts.buffers[ref["nd"]] * 2)[: k * row]
        if fields["crop_bits"] is not None:  # as many bits as the K + 1 crops have pixels
            boxes = np.frombuffer(parts.buffers[fields["crop_boxes"]["nd"]], np.int32).reshape(-1, 4)
            ref = fields["crop_bits"]
            ref["shape"] = [(_pixels(boxes) + 7) // 8]
            parts.buffers[ref["nd"]] = bytes(ref["shape"][0])

    def _kind(self, parts: Parts, endpoint: str) -> str | None:
        """A valid message of a kind this socket does not take."""
        other = self.rng.choice([e for e in INBOXES if e != endpoint])
        _, template = self.rng.choice([t for t in self.templates[other] if t[0] != "EndOfStream"])
        replacement = Parts.of(template)
        parts.__dict__.update(replacement.__dict__)
        return "kind"


@dataclass
class Parts:
    """A message's internal-wire frames, taken apart to be mutated."""

    topic: bytes
    meta: dict[str, Any]
    table: Any
    buffers: list[bytes]
    raw_header: bytes | None = None
    raw_table: bytes | None = None
    extra: list[bytes] | None = None
    drop: int = 0

    @classmethod
    def of(cls, frames: list[bytes]) -> Parts:
        topic, header, table, *buffers = frames
        return cls(topic, msgpack.unpackb(header), msgpack.unpackb(table, strict_map_key=False) if table else None,
                   list(buffers))

    def frames(self) -> list[bytes]:
        header = self.raw_header if self.raw_header is not None else msgpack.packb(self.meta, use_bin_type=True)
        table = self.raw_table if self.raw_table is not None else (msgpack.packb(self.table) if self.table else b"")
        out = [self.topic, header, table, *self.buffers, *(self.extra or [])]
        return out[: max(1, len(out) - self.drop)]  # a ZeroMQ message has at least one frame


def _wire(message: Any) -> list[bytes]:
    topic, header, *buffers = encode(message)
    return [bytes(topic), bytes(header), b"", *(bytes(b) for b in buffers)]


def _in_slot(message: Any, ring: str, rng: random.Random) -> list[bytes]:
    """`message`'s frames as if its buffer lay in a slot of `ring`: a slot of the run's ring, with a
    generation its producer never handed out (no message of this test can read the run's pixels)."""
    topic, header, _, buffer = _wire(message)
    table = {0: [ring, rng.randrange(8), rng.getrandbits(62), len(buffer)]}
    return [topic, header, msgpack.packb(table), b""]


def _boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    x0, y0 = rng.random(n) * (w / 2), rng.random(n) * (h / 2)
    return np.stack([x0, y0, x0 + 1 + rng.random(n) * (w / 2 - 1), y0 + 1 + rng.random(n) * (h / 2 - 1)],
                    axis=1).astype(np.float32)


def _pixels(crop_boxes: np.ndarray) -> int:
    """The pixels of int32 [N, 4] crop boxes (x0, y0, x1, y1, ends exclusive), all together."""
    return int(((crop_boxes[:, 2] - crop_boxes[:, 0]).astype(np.int64) * (crop_boxes[:, 3] - crop_boxes[:, 1])).sum())


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths to every leaf of a plain tree (array references count as leaves: their keys, each)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and node:
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path


def _maps(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _maps(value)
    elif isinstance(node, list):
        for value in node:
            yield from _maps(value)


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def _forever(items: list[Any]) -> Iterator[Any]:
    while True:
        yield from items
