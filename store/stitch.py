"""One read-only array over many shard files: each file is mapped at its place in one reserved address range.

A batch of random ids then becomes a single numpy gather, as fast as from one memmap, instead of one gather
per shard touched. Linux on x86-64 or arm64 only, and only when a shard's rows fill whole memory pages
(rows_per_shard * dim * itemsize a multiple of the page size: true for the defaults); the reader falls back
to per-shard maps otherwise. Slots of unfinished shards stay unreadable (PROT_NONE): the reader checks
completion before every gather, as it must anyway.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import weakref
from pathlib import Path

import numpy as np

_MAP_FIXED = 0x10  # the same on x86-64 and arm64 Linux; not exported by the mmap module
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def supported(rows_per_shard: int, dim: int, itemsize: int) -> bool:
    return (
        sys.platform == "linux"
        and platform.machine() in ("x86_64", "aarch64")
        and (rows_per_shard * dim * itemsize) % mmap.PAGESIZE == 0
    )


class StitchedRows:
    """`array` is (rows, dim) over the reserved range; `map_shard` makes one shard's slot readable."""

    def __init__(self, rows: int, dim: int, dtype: np.dtype, rows_per_shard: int) -> None:
        self._libc = _libc()
        self._shard_bytes = rows_per_shard * dim * dtype.itemsize
        n_shards = -(-rows // rows_per_shard)
        total = n_shards * self._shard_bytes
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        base = self._libc.mmap(None, total, _PROT_NONE, flags, -1, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "cannot reserve address space for the store")
        self._base = base
        self._row_bytes = dim * dtype.itemsize
        buffer = (ctypes.c_char * (rows * self._row_bytes)).from_address(base)
        # Every view of the array keeps `buffer` alive (numpy's base chain ends there), so the range is
        # released only after the last view is gone.
        weakref.finalize(buffer, self._libc.munmap, base, total)
        array = np.frombuffer(buffer, dtype=dtype).reshape(rows, dim)
        array.flags.writeable = False
        self.array = array

    def map_shard(self, shard: int, path: Path, offset: int, rows: int) -> None:
        """Map `rows` rows stored contiguously at `offset` (a multiple of the page size) of `path`."""
        if offset % mmap.PAGESIZE:
            raise OSError(f"{path}: rows start at {offset}, not at a page boundary")
        length = -(-rows * self._row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        where = self._base + shard * self._shard_bytes
        fd = os.open(path, os.O_RDONLY)
        try:
            got = self._libc.mmap(where, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
        finally:
            os.close(fd)
        if got != where:
            raise OSError(ctypes.get_errno(), f"cannot map {path}")
