"""Is a finished shard still what its writer wrote? Checks cheap enough for every reader, once per shard.

A completion mark holds the crc32c of each block of rows (google-crc32c, which zarr itself depends on, runs at
about 10 GB/s), so a reader checks a shard in full the first time it touches it and later batches pay nothing.
Marks written before block checksums existed fall back to the rows' sha256 (about 1 GB/s).
"""

from __future__ import annotations

import hashlib

import google_crc32c
import numpy as np

from store.marks import ShardMark


def _read_only(rows: np.ndarray) -> np.ndarray:
    """Little-endian, C-contiguous, read-only rows: the form google_crc32c hashes without copying."""
    rows = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    if rows.flags.writeable:
        rows = rows.view()
        rows.flags.writeable = False
    return rows


def rows_sha256(rows: np.ndarray) -> str:
    """Checksum of rows as stored: little-endian, row-major bytes (the same in every backend)."""
    rows = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    return hashlib.sha256(memoryview(rows).cast("B")).hexdigest()


def block_checksums(rows: np.ndarray, block_rows: int) -> list[int]:
    """crc32c of rows [0, b), [b, 2b), ... (the last block may be shorter) over their stored bytes."""
    rows = _read_only(rows)
    return [google_crc32c.value(rows[i : i + block_rows]) for i in range(0, len(rows), block_rows)]


def damaged_rows(rows: np.ndarray, mark: ShardMark) -> tuple[int, int] | None:
    """The first row range [a, b) (canonical ids) whose bytes differ from what the mark recorded; None if intact.

    Reads every byte of `rows` (a shard's stored rows, e.g. a memory map of its file)."""
    if len(rows) != mark.stop - mark.start:
        return mark.start, mark.stop
    if mark.block_rows and mark.block_crc32c is not None:
        found = block_checksums(rows, mark.block_rows)
        if len(found) != len(mark.block_crc32c):
            return mark.start, mark.stop
        for block, (ours, theirs) in enumerate(zip(found, mark.block_crc32c, strict=True)):
            if ours != theirs:
                first = mark.start + block * mark.block_rows
                return first, min(first + mark.block_rows, mark.stop)
        return None
    # A mark of an older store: only the whole shard's sha256 to go by.
    return None if rows_sha256(rows) == mark.data_sha256 else (mark.start, mark.stop)
