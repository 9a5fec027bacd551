"""Page-locking memory torch did not allocate (the shared-memory rings' mappings) for CUDA copies.

A copy to the device from pageable memory goes through a driver staging buffer: the CPU copies
the frame once more and the copy cannot run asynchronously. `cudaHostRegister` page-locks a
mapping where it lies, so the device reads it directly (one DMA). A ring is registered whole, the
first time one of its slots is seen, and unregistered before its mapping can go (`close`).
"""
from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import torch

__all__ = ["PageLocks"]

_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context of the process


class PageLocks:
    """The mappings this process registered with CUDA, by address; nothing is done on a CPU."""

    def __init__(self) -> None:
        self._registered: dict[int, tuple[mmap.mmap, int]] = {}  # address -> (mapping kept alive, bytes)
        self.problem: str | None = None  # why a mapping could not be registered (copies then stage)

    def register(self, array: np.ndarray) -> bool:
        """Page-lock the memory mapping `array` lies in (a ring slot's view), once; False when
        `array` is in no mapping or CUDA refused (then `problem` says why; copies still work)."""
        mapping = _mapping_of(array)
        if mapping is None:
            return False
        address = _address(mapping)
        if address in self._registered:
            return True
        code = torch.cuda.cudart().cudaHostRegister(address, len(mapping), _REGISTER_PORTABLE)
        if int(code) != 0:
            self.problem = f"cudaHostRegister of a {len(mapping)}-byte ring failed with CUDA error {int(code)}"
            _take_pending_error()
            return False
        self._registered[address] = (mapping, len(mapping))
        return True

    def close(self) -> None:
        """Unregister everything (before the rings are unmapped)."""
        for address in list(self._registered):
            torch.cuda.cudart().cudaHostUnregister(address)
            del self._registered[address]


def _take_pending_error() -> None:
    """A failed runtime call leaves its error pending in the CUDA runtime, where torch's check after
    the next kernel launch (cudaGetLastError) would find it and fail that unrelated launch: one
    launch here takes it instead."""
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass


def _mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The mmap an array's memory belongs to, following its bases (view -> memoryview -> mmap)."""
    base: Any = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return None


def _address(mapping: mmap.mmap) -> int:
    view = np.frombuffer(mapping, dtype=np.uint8, count=1)
    address = int(view.ctypes.data)
    del view  # an exported view would keep the mapping from closing
    return address
