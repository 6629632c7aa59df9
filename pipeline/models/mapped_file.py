"""Giving back a memory-mapped checkpoint's pages once their tensors have been copied out.

`torch.load(path, mmap=True, weights_only=True)` maps the whole file privately: a tensor's pages are read in when it
is first used and then stay counted in the process's resident memory until the mapping goes, which is when the last
tensor of the file is freed. A loader that copies every tensor into the model (fusing q/k/v, casting to the run's
precision) would therefore still peak at the file plus the model. `MappedFile.release(tensor)` drops the tensor's
pages from this process (madvise MADV_DONTNEED) right after the copy, so the peak stays near one copy.

Why this cannot change any tensor: on a private file mapping whose pages were never written, MADV_DONTNEED only
removes this process's page table entries; a later read faults the same bytes back in from the file. The call is
made only for memory inside a private mapping of that very file (read from /proc/self/maps), never on ordinary
memory, where it would zero the pages. Where that cannot be checked (not Linux) it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

__all__ = ["MappedFile", "file_mappings"]

_MADV_DONTNEED = 4  # Linux's value (asm-generic/mman-common.h)


def file_mappings(path: str | Path) -> list[tuple[int, int]]:
    """(start, end) address ranges of this process's private mappings of `path` (empty off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                # start-end perms offset dev inode pathname (the pathname may hold spaces)
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == target and fields[1].endswith("p"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


class MappedFile:
    """The mappings of one checkpoint file, read once right after `torch.load(..., mmap=True, weights_only=True)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ranges = file_mappings(path)
        self._madvise = _madvise() if self.ranges else None
        self.released_bytes = 0

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages of `tensor`'s storage if they lie in a mapping of this file; else nothing."""
        if self._madvise is None or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        end = start + storage.nbytes()
        if not any(low <= start and end <= high for low, high in self.ranges):
            return
        page = mmap.PAGESIZE
        # Whole pages inside the storage only: a page shared with a neighbouring tensor stays (it is small).
        low, high = -(-start // page) * page, end // page * page
        if high > low and self._madvise(low, high - low, _MADV_DONTNEED) == 0:
            self.released_bytes += high - low
