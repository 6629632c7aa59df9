"""Records grouped by a 64-bit hash in bounded memory, for the passes over every row of a web-scale dataset
(duplicate keys in prepare, repeated captions in check).

Records are a numpy structured array with a ``hash`` field (uint64). While fewer than ``buffer_rows`` have
arrived they stay in memory; past that, every record goes to one of ``buckets`` files by the hash's top bits, so
records of equal hash always share a bucket. `groups()` then hands out one bucket at a time, sorted by hash:
memory is one bucket (about rows / buckets records) plus the buffer, whatever the dataset's size. A billion
captions at 33 bytes each spill 33 GB to disk and are grouped 130 MB at a time.

The files live in a temporary directory under ``directory`` (the canonical directory: /tmp may be too small for
a large dataset) and are removed by `close()` (the class is a context manager).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["SpilledGroups", "BUFFER_ROWS"]

# Records held before spilling: 1-2 MB (records are 20-33 bytes; flushing copies them twice), so a dataset of any
# size stays near the memory of a small one. Spilling is cheap (each record written and read once), so it starts
# early: beyond 65k rows.
BUFFER_ROWS = 1 << 16


class SpilledGroups:
    def __init__(self, dtype: np.dtype, directory: str | Path, *, buckets: int = 256, buffer_rows: int = BUFFER_ROWS):
        self.dtype = np.dtype(dtype)
        if "hash" not in (self.dtype.names or ()) or self.dtype["hash"] != np.uint64:
            raise ValueError("records need a uint64 field named 'hash'")
        if buckets < 1 or buckets & (buckets - 1) or buckets > 1 << 16:
            raise ValueError(f"buckets must be a power of two up to 65536, got {buckets}")
        self.buckets = buckets
        self.buffer_rows = buffer_rows
        self._directory = Path(directory)
        self._spill: Path | None = None
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.rows = 0

    def __enter__(self) -> SpilledGroups:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, records: np.ndarray) -> None:
        if records.dtype != self.dtype:
            raise ValueError(f"records of dtype {records.dtype}, expected {self.dtype}")
        if not len(records):
            return
        self._buffer.append(records.copy())
        self._buffered += len(records)
        self.rows += len(records)
        if self._buffered >= self.buffer_rows:
            self._flush()

    def _bucket_path(self, bucket: int) -> Path:
        assert self._spill is not None
        return self._spill / f"{bucket:05d}.bin"

    def _flush(self) -> None:
        if self._spill is None:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._spill = Path(tempfile.mkdtemp(prefix=".spill-", dir=self._directory))
        records = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        shift = np.uint64(64 - self.buckets.bit_length() + 1)
        bucket_of = (records["hash"] >> shift).astype(np.int64) if self.buckets > 1 else np.zeros(len(records), int)
        order = np.argsort(bucket_of, kind="stable")
        records, bucket_of = records[order], bucket_of[order]
        edges = np.searchsorted(bucket_of, np.arange(self.buckets + 1))
        for bucket in np.flatnonzero(np.diff(edges)):
            with self._bucket_path(int(bucket)).open("ab") as handle:
                records[edges[bucket] : edges[bucket + 1]].tofile(handle)

    def groups(self) -> Iterator[np.ndarray]:
        """Every record once, bucket by bucket, each bucket sorted by hash (stable: equal hashes keep their order
        of arrival). Records of equal hash are always in the same bucket."""
        if self._spill is None:
            records = np.concatenate(self._buffer) if self._buffer else np.zeros(0, self.dtype)
            yield records[np.argsort(records["hash"], kind="stable")]
            return
        if self._buffer:
            self._flush()
        for bucket in range(self.buckets):
            path = self._bucket_path(bucket)
            if path.exists():
                records = np.fromfile(path, dtype=self.dtype)
                yield records[np.argsort(records["hash"], kind="stable")]

    def close(self) -> None:
        self._buffer, self._buffered = [], 0
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None
