"""A same-host shared-memory ring of fixed-size slots for pixel buffers.

One producer process puts a buffer into a free slot and sends only a `SlotRef` (ring
name, slot, generation, size) through ZeroMQ; the consumer reads the slot in place and
releases it. Copying 6.2 MB through an ipc socket costs ~2-3 ms of CPU per hop on this
machine class; `write` (copy into a slot) costs one memcpy (~0.2-0.5 ms) on the producer
side and nothing on the consumer side; `claim` costs no copy at all: the producer makes
its pixels straight in the slot (e.g. the decoder's colour conversion writes there) and
pipeline.runtime.transport.pack recognises the claimed slot and sends its reference
(see benchmarks/bench_transport.py).

Layout of the segment:

    [0, 64)                  magic, slots, slot_bytes (uint64)
    [64, 64 + 24 * slots)    per slot: generation, busy (0/1), written_at_ns (int64)
    [DATA, ...)              slot i at DATA + i * slot_bytes (DATA 4 KiB aligned)

Ownership and cleanup: whoever calls `Ring.create` (the supervisor) owns the segment and
unlinks it (`close(unlink=True)`). Processes started with multiprocessing share the
creator's resource tracker, so if the owner alone dies without unlinking, the tracker unlinks
the segment once every process that knew about it has exited. A SIGKILL of the whole process
group takes the tracker too, and the segments (RAM, in /dev/shm) would stay until reboot: so a
run names what it leaves on the machine after its owner (`owner_tag`: the process id and its
start time, which tells a reused process id apart), and `remove_dead_rings` removes the segments
whose owner has gone (`maskstream run` and `maskstream doctor` call it).

Slots and failures: the producer marks a slot busy, the consumer marks it free. A consumer
that dies leaves its slots busy; the producer reclaims the oldest slot once the ring has
been full for `reclaim_after_s`, bumping its generation, and a restarted producer reclaims
every busy slot. A consumer holding a reference with an old generation sees `SlotReclaimed`
instead of someone else's pixels. (The generation check and the release are separate
stores, not a compare-and-swap: a reclaim racing a release within microseconds could
free a slot early. Reclaims happen only after seconds of a full ring, so this is accepted.)
"""
from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

__all__ = ["Ring", "RingFull", "RingReaders", "SlotReclaimed", "SlotRef", "owner_alive", "owner_of", "owner_tag",
           "remove_dead_rings"]

_MAGIC = 0x4D534B52494E4731  # "MSKRING1"
_META_FIELDS = 3  # generation, busy, written_at_ns
_DATA_ALIGN = 4096


class RingFull(RuntimeError):
    """No free slot within the time allowed."""


class SlotReclaimed(RuntimeError):
    """A slot was reused by its producer before this reference was read."""


@dataclass(frozen=True)
class SlotRef:
    """Where one buffer lies: ring name, slot index, the slot's generation, byte count."""

    ring: str
    slot: int
    generation: int
    nbytes: int


def _data_offset(slots: int) -> int:
    end = 64 + 8 * _META_FIELDS * slots
    return (end + _DATA_ALIGN - 1) // _DATA_ALIGN * _DATA_ALIGN


class Ring:
    """A mapped ring segment; `create` (owner) or `attach` (producer/consumer processes)."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self._shm = shm
        self.owner = owner
        self.name = shm.name
        assert shm.buf is not None, "a freshly mapped segment has a buffer"
        head: list[int] = np.frombuffer(shm.buf, np.uint64, 3).tolist() if shm.size >= 64 else [0, 0, 0]
        magic, self.slots, self.slot_bytes = head
        if magic != _MAGIC or shm.size < _data_offset(self.slots) + self.slots * self.slot_bytes:
            shm.close()
            raise ValueError(f"shared memory {shm.name!r} is not a maskstream ring")
        # [slots, 3]: generation, busy, written_at_ns
        self.meta = np.ndarray((self.slots, _META_FIELDS), dtype=np.int64, buffer=shm.buf, offset=64)
        self._data = _data_offset(self.slots)
        self._address = _address(shm.buf)  # of the mapping in this process: tells a claimed slot's buffer
        self._claims: dict[int, SlotRef] = {}  # producer: slots claimed and not yet handed to a message

    @classmethod
    def create(cls, name: str, slots: int, slot_bytes: int) -> Ring:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"ring {name!r}: slots and slot_bytes must be >= 1, got {slots}, {slot_bytes}")
        shm = shared_memory.SharedMemory(name=name, create=True, size=_data_offset(slots) + slots * slot_bytes)
        head = np.ndarray((3,), dtype=np.uint64, buffer=shm.buf)
        head[1], head[2] = slots, slot_bytes
        meta = np.ndarray((slots, _META_FIELDS), dtype=np.int64, buffer=shm.buf, offset=64)
        meta[:] = 0
        # Generations start at random: a reference that this ring's producer did not hand out (a
        # crafted or corrupted message) names a slot's current generation only by a 1 in 2**62 chance.
        meta[:, 0] = np.frombuffer(secrets.token_bytes(8 * slots), dtype=np.int64) >> 2
        del meta
        head[0] = _MAGIC  # last: an attacher never sees a half-initialised header
        del head
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Map an existing ring; ValueError if there is none of that name or it is not a ring."""
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise ValueError(f"shared-memory ring {name!r} does not exist (its owner has exited?)") from None
        except (OSError, ValueError) as exc:  # a name that is no segment name ("a/b")
            raise ValueError(f"shared-memory ring {name[:100]!r}: {exc}") from None
        return cls(shm, owner=False)

    def slot_view(self, slot: int, nbytes: int) -> memoryview:
        start = self._data + slot * self.slot_bytes
        buf = self._shm.buf
        assert buf is not None, "ring is closed"
        return buf[start : start + nbytes]

    def busy_slots(self) -> int:
        return int(self.meta[:, 1].sum())

    # ------------------------------------------------------------------ producer side

    def reclaim_all(self) -> None:
        """A (re)starting producer: every busy slot belongs to a message of its previous life."""
        busy = self.meta[:, 1] != 0
        self.meta[busy, 0] += 1
        self.meta[busy, 1] = 0

    def write(
        self,
        data: memoryview,
        timeout_s: float | None,
        reclaim_after_s: float = 120.0,
        on_wait: Callable[[], None] | None = None,
    ) -> SlotRef:
        """Copy `data` into a free slot; wait up to timeout_s (None: forever) while the ring is full.

        timeout_s=0 never waits (live streams drop instead). on_wait runs while waiting,
        e.g. to keep heartbeats going. Raises RingFull, or ValueError if data is too big."""
        ref = self._acquire(data.nbytes, timeout_s, reclaim_after_s, on_wait)
        self.slot_view(ref.slot, ref.nbytes)[:] = data
        return ref

    def claim(
        self,
        nbytes: int,
        timeout_s: float | None,
        reclaim_after_s: float = 120.0,
        on_wait: Callable[[], None] | None = None,
    ) -> memoryview:
        """A free slot's first nbytes, writable, for the producer to fill in place (waits as `write`).

        Sending a message whose buffer is exactly this view moves the slot into the message
        (`take_claim`, called by pipeline.runtime.transport.pack) instead of copying it; a claim never
        sent is given back by `release_claims`."""
        ref = self._acquire(nbytes, timeout_s, reclaim_after_s, on_wait)
        self._claims[ref.slot] = ref
        return self.slot_view(ref.slot, nbytes)

    def take_claim(self, buffer: memoryview) -> SlotRef | None:
        """The claimed slot that `buffer` is exactly (same start, same size), now owned by the
        message being sent; None when it is not a claimed slot."""
        offset = _address(buffer) - self._address - self._data
        slot, within = divmod(offset, self.slot_bytes)
        ref = self._claims.get(slot) if offset >= 0 and within == 0 else None
        if ref is None or ref.nbytes != buffer.nbytes:
            return None
        del self._claims[slot]
        return ref

    def release_claims(self) -> None:
        """Give back every claimed slot that was not sent (its frame was skipped or dropped)."""
        for ref in self._claims.values():
            self.release(ref)
        self._claims.clear()

    def _acquire(
        self, nbytes: int, timeout_s: float | None, reclaim_after_s: float, on_wait: Callable[[], None] | None
    ) -> SlotRef:
        if nbytes > self.slot_bytes:
            raise ValueError(f"ring {self.name!r}: buffer of {nbytes} bytes exceeds the slot size {self.slot_bytes}")
        start = time.monotonic()
        delay = 50e-6
        while True:
            free = np.flatnonzero(self.meta[:, 1] == 0)
            if free.size:
                slot = int(free[0])
                break
            waited = time.monotonic() - start
            if waited >= reclaim_after_s:
                slot = int(np.argmin(self.meta[:, 2]))  # oldest: its consumer is dead or stuck
                self.meta[slot, 0] += 1
                break
            if timeout_s is not None and waited >= timeout_s:
                raise RingFull(f"ring {self.name!r}: all {self.slots} slots busy for {waited:.3f} s")
            if on_wait is not None:
                on_wait()
            time.sleep(delay)
            delay = min(delay * 2, 2e-3)
        self.meta[slot, 1] = 1
        self.meta[slot, 2] = time.monotonic_ns()
        return SlotRef(self.name, slot, int(self.meta[slot, 0]), nbytes)

    # ------------------------------------------------------------------ consumer side

    def read(self, ref: SlotRef) -> memoryview:
        """The slot's bytes, in place. Valid until `release(ref)`. A reference from elsewhere than this
        ring's producer (a slot out of range, more bytes than a slot, a generation that is not the
        slot's: stale or made up) raises ValueError or SlotReclaimed, and reads nothing."""
        if not 0 <= ref.slot < self.slots or not 0 <= ref.nbytes <= self.slot_bytes:
            raise ValueError(f"ring {self.name!r}: no slot {ref.slot} of {ref.nbytes} bytes (ring: {self.slots} "
                             f"slots of {self.slot_bytes})")
        if not self.intact(ref):
            raise SlotReclaimed(f"ring {self.name!r} slot {ref.slot}: reclaimed by its producer before it was read")
        return self.slot_view(ref.slot, ref.nbytes)

    def intact(self, ref: SlotRef) -> bool:
        return int(self.meta[ref.slot, 0]) == ref.generation and int(self.meta[ref.slot, 1]) == 1

    def release(self, ref: SlotRef) -> None:
        if int(self.meta[ref.slot, 0]) == ref.generation:
            self.meta[ref.slot, 1] = 0

    def close(self, unlink: bool = False) -> None:
        """Unmap (and, for the owner, remove the segment). Views still exported stay valid until dropped."""
        self.meta = np.zeros((0, _META_FIELDS), dtype=np.int64)
        try:
            self._shm.close()
        except BufferError:  # a numpy view of a slot is still alive; the mapping goes with the process
            pass
        if unlink:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass


def _address(buffer: memoryview) -> int:
    """Where a buffer starts in this process's memory (no copy: a numpy view of its first byte)."""
    view = np.frombuffer(buffer, dtype=np.uint8, count=min(1, buffer.nbytes))
    address = int(view.ctypes.data)
    del view  # an exported view would keep the mapping from closing
    return address


class RingReaders:
    """A consumer's attached rings, by name (attached on first use, kept for the process's life).

    allowed: the names of the rings this consumer may read (the run's rings its producers write,
    pipeline.runtime.stage.Wiring.reads); any other name is refused before anything is opened.
    None: any ring (tools and tests that make their own)."""

    def __init__(self, allowed: Iterable[str] | None = None) -> None:
        self._rings: dict[str, Ring] = {}
        self.allowed = None if allowed is None else frozenset(allowed)

    def ring(self, name: str) -> Ring:
        ring = self._rings.get(name)
        if ring is None:
            if self.allowed is not None and name not in self.allowed:
                raise ValueError(f"ring {name[:100]!r} is not a ring this stage reads "
                                 f"({', '.join(sorted(self.allowed)) or 'none'})")
            ring = self._rings[name] = Ring.attach(name)
        return ring

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()


# ---------------------------------------------------------------------------- owners of what a run leaves

SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory, one file per segment
# maskstream-PID-START-...: START is the owner's start time in clock ticks after boot (0 where the
# system does not say). Names from before START was added (maskstream-PID-random-...) match with PID alone.
_OWNED = re.compile(r"maskstream-(\d+)(?:-(\d+))?(?:-|$)")


def owner_tag(pid: int | None = None) -> str:
    """'maskstream-PID-START': the prefix of every ring a run makes, and what its socket folder's
    owner file says (pipeline.run_config.run_folder), naming the owner: the process that creates
    them and removes them at the end (the supervisor's)."""
    pid = os.getpid() if pid is None else pid
    return f"maskstream-{pid}-{_process_start(pid) or 0}"


def owner_of(name: str) -> tuple[int, int | None] | None:
    """(pid, start time or None) of the owner a ring's or folder's name carries; None for other names."""
    match = _OWNED.match(name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)) if match.group(2) is not None else None


def owner_alive(pid: int, start: int | None) -> bool:
    """Whether the process that made a name is still running: its pid exists, is no zombie, and
    (when the name says) started when the name says, so a pid reused by another process counts as gone."""
    started = _process_start(pid)
    if started is None:
        return False
    return start is None or not started or not start or started == start


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, from /proc); 0 where this system does not
    say; None when there is no such process or only its zombie is left."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except OSError:
        return 0  # exists, but cannot be read: alive as far as we can tell
    else:
        # after the command name, which may hold spaces and parentheses: state is field 3, starttime 22
        fields = stat[stat.rindex(")") + 2:].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def remove_dead_rings(shm_dir: Path = SHM_DIR) -> list[tuple[str, int]]:
    """Remove the ring segments whose owner has gone (a run killed with its whole process group);
    (name, bytes) of each removed. Another user's segments, and anything this process may not
    remove, stay. Where the system keeps no /dev/shm, nothing is found."""
    removed = []
    try:
        names = sorted(os.listdir(shm_dir))
    except OSError:
        return []
    for name in names:
        owner = owner_of(name)
        if owner is None or owner_alive(*owner):
            continue
        path = shm_dir / name
        try:
            size = path.stat().st_size
            path.unlink()  # shm_unlink: the memory goes once no process maps it
        except OSError:
            continue
        removed.append((name, size))
    return removed
