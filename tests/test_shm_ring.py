"""The shared-memory ring for real: two processes, slots released, back-pressure, reclaim, cleanup."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from maskstream.pipeline.runtime.shm_ring import Ring, RingFull, RingReaders, SlotReclaimed


def _name(tag: str) -> str:
    return f"msk-test-{os.getpid()}-{tag}"


def test_write_read_release_in_another_process():
    ring = Ring.create(_name("a"), slots=2, slot_bytes=1000)
    try:
        ref = ring.write(memoryview(np.arange(100, dtype=np.uint8)), timeout_s=0)
        with mp.get_context("spawn").Pool(1) as pool:
            total = pool.apply(_read_and_release, (ref,))
        assert total == sum(range(100))
        assert ring.busy_slots() == 0  # the consumer released it
    finally:
        ring.close(unlink=True)
    assert not Path(f"/dev/shm/{ring.name}").exists()


def _read_and_release(ref):
    readers = RingReaders()
    ring = readers.ring(ref.ring)
    total = int(np.frombuffer(ring.read(ref), dtype=np.uint8).sum())
    ring.release(ref)
    readers.close()
    return total


def test_full_ring_back_pressures_then_reclaims_the_oldest():
    ring = Ring.create(_name("b"), slots=2, slot_bytes=16)
    try:
        first = ring.write(memoryview(b"a" * 16), timeout_s=0)
        ring.write(memoryview(b"b" * 16), timeout_s=0)
        with pytest.raises(RingFull):
            ring.write(memoryview(b"c" * 16), timeout_s=0.01)
        # A consumer that died holding `first`: after reclaim_after_s its slot is reused ...
        third = ring.write(memoryview(b"c" * 16), timeout_s=None, reclaim_after_s=0.02)
        assert third.slot == first.slot and third.generation == first.generation + 1
        # ... and the dead consumer's reference no longer reads someone else's pixels.
        with pytest.raises(SlotReclaimed):
            ring.read(first)
        ring.release(first)  # a stale release frees nothing
        assert ring.busy_slots() == 2
        assert bytes(ring.read(third)) == b"c" * 16
    finally:
        ring.close(unlink=True)


def test_restarted_producer_reclaims_every_busy_slot():
    ring = Ring.create(_name("c"), slots=3, slot_bytes=8)
    try:
        refs = [ring.write(memoryview(b"x" * 8), timeout_s=0) for _ in range(3)]
        producer = Ring.attach(ring.name)
        producer.reclaim_all()
        assert ring.busy_slots() == 0 and not any(ring.intact(r) for r in refs)
        producer.close()
    finally:
        ring.close(unlink=True)


def test_oversized_buffer_and_unknown_ring_are_clear_errors():
    ring = Ring.create(_name("d"), slots=1, slot_bytes=8)
    try:
        with pytest.raises(ValueError, match="exceeds the slot size 8"):
            ring.write(memoryview(b"x" * 9), timeout_s=0)
    finally:
        ring.close(unlink=True)
    with pytest.raises(ValueError, match="does not exist"):
        Ring.attach(_name("missing"))


def test_segment_removed_when_the_owner_process_is_killed():
    # A supervisor killed with SIGKILL: its resource tracker (its own process, shared with the
    # stages it spawned) unlinks the segments once every process that held it has gone.
    name = _name("e")
    code = (f"from maskstream.pipeline.runtime.shm_ring import Ring; import time; Ring.create({name!r}, 1, 8); "
            "print('ready', flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        assert Path(f"/dev/shm/{name}").exists()
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/dev/shm/{name}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/dev/shm/{name}").exists()


def test_claimed_slot_is_filled_in_place_and_handed_over_or_given_back():
    ring = Ring.create(_name("claim"), slots=2, slot_bytes=64)
    try:
        view = ring.claim(48, timeout_s=0)
        np.frombuffer(view, dtype=np.uint8)[:] = 7  # the producer makes its pixels right there
        assert ring.take_claim(memoryview(bytearray(48))) is None  # ordinary memory: not a claim
        assert ring.take_claim(view[:40]) is None  # a part of a slot is not the claimed buffer
        ref = ring.take_claim(view)
        assert ref is not None and ref.nbytes == 48 and bytes(ring.read(ref)) == b"\x07" * 48
        assert ring.take_claim(view) is None  # handed over once
        ring.claim(8, timeout_s=0)
        assert ring.busy_slots() == 2
        ring.release_claims()  # the unsent claim comes back; the handed-over slot stays busy
        assert ring.busy_slots() == 1
        del view  # a live view of the mapping would keep it from closing
    finally:
        ring.close(unlink=True)
