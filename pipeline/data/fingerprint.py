"""The canonical dataset's fingerprint: sha256 over every id, key, path, split and caption text, in row order.

Two ways to the same value: `fingerprint_tables` over tables in memory, and `fingerprint_files` over the
Parquet files a batch at a time, which prepare and check use so that a web-scale dataset is never held whole.
Per column the hash takes the column name, the row count, then for integers the little-endian int64 values and
for strings the int64 offsets (relative to the first) followed by the UTF-8 bytes. Strings are hashed through
Arrow's buffers, with no Python loop over rows.

`fingerprint_files` also checks, on the way, what `CanonicalDataset` checks in memory: the columns exist, ids are
dense 0..N-1 in row order, every caption's image exists, no nulls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.rows import CAPTIONS_SCHEMA, IMAGES_SCHEMA
from pipeline.errors import DsmdError

__all__ = ["SCHEMA_VERSION", "fingerprint_tables", "fingerprint_files"]

SCHEMA_VERSION = 1
_BATCH_ROWS = 1 << 13


def _start(schema_version: int = SCHEMA_VERSION) -> Any:
    return hashlib.sha256(f"dsmd-canonical-v{schema_version}".encode())


def _int_bytes(values: pa.Array) -> bytes:
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype="<i8").tobytes()


def _string_parts(chunk: pa.Array) -> tuple[np.ndarray, memoryview | bytes]:
    """A string chunk's offsets (from 0, int64) and its UTF-8 bytes."""
    chunk = chunk.cast(pa.large_string())
    if chunk.null_count:
        raise DsmdError("canonical tables must not hold nulls")
    if len(chunk) == 0:
        return np.zeros(1, "<i8"), b""
    _, offsets_buffer, data_buffer = chunk.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype="<i8", count=len(chunk) + 1, offset=chunk.offset * 8)
    start, end = int(offsets[0]), int(offsets[-1])
    data = memoryview(data_buffer)[start:end] if data_buffer is not None else b""
    return (offsets - start).astype("<i8"), data


def _hash_strings(digest: Any, rows: int, chunks) -> None:
    """``chunks``: a callable giving the column's chunks afresh (offsets go first, then all the bytes)."""
    digest.update(rows.to_bytes(8, "little"))
    if rows == 0:
        return
    base = 0
    for position, chunk in enumerate(chunks()):
        offsets, _ = _string_parts(chunk)
        # Chunks after the first continue the previous offsets; their leading 0 repeats its end.
        digest.update((offsets[(0 if position == 0 else 1):] + base).tobytes())
        base += int(offsets[-1])
    for chunk in chunks():
        digest.update(_string_parts(chunk)[1])


def _table_chunks(column: pa.ChunkedArray | pa.Array):
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return lambda: (chunk for chunk in chunks if len(chunk))


def fingerprint_tables(images: pa.Table, captions: pa.Table) -> str:
    """sha256 (hex) of the canonical content of two tables in memory."""
    digest = _start()
    for table, schema in ((images, IMAGES_SCHEMA), (captions, CAPTIONS_SCHEMA)):
        for field in schema:
            digest.update(field.name.encode() + b"\x00")
            column = table.column(field.name)
            if pa.types.is_integer(field.type):
                digest.update(len(column).to_bytes(8, "little"))
                for chunk in _table_chunks(column)():
                    digest.update(_int_bytes(chunk))
            else:
                _hash_strings(digest, len(column), _table_chunks(column))
    return digest.hexdigest()


def column_batches(path: Path, name: str, rows: int = _BATCH_ROWS) -> Iterator[pa.Array]:
    """One column of a Parquet file, a batch at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=[name]):
        yield batch.column(0)


class _Checks:
    """The invariants of the two tables, checked on the batches as they stream past."""

    def __init__(self, where: str):
        self.where = where
        self.num_images = 0

    def dense(self, values: np.ndarray, start: int) -> None:
        if not np.array_equal(values, np.arange(start, start + len(values))):
            raise DsmdError(f"{self.where}: ids are not dense 0..N-1 in row order; rerun `dsmd data prepare`")

    def owners(self, values: np.ndarray, start: int) -> None:
        if len(values) and (values.min() < 0 or values.max() >= self.num_images):
            raise DsmdError(f"{self.where}: a caption points at an image id that does not exist; rerun prepare")


def fingerprint_files(images_path: Path, captions_path: Path, where: str,
                      batch_rows: int = _BATCH_ROWS) -> tuple[str, int, int]:
    """The fingerprint of the two Parquet files, read ``batch_rows`` at a time, and their row counts. Raises
    DsmdError for files that break the canonical invariants or cannot be read."""
    checks = _Checks(where)
    digest = _start()
    counts = []
    # What each id column must satisfy: captions point at images, so the images are read first.
    files = ((images_path, IMAGES_SCHEMA, {"image_id": checks.dense}),
             (captions_path, CAPTIONS_SCHEMA, {"caption_id": checks.dense, "image_id": checks.owners}))
    try:
        for path, schema, rules in files:
            parquet = pq.ParquetFile(path)
            rows = parquet.metadata.num_rows
            counts.append(rows)
            missing = [n for n in schema.names if n not in parquet.schema_arrow.names]
            if missing:
                raise DsmdError(f"{where}: {path.name} lacks the columns {missing}; rerun `dsmd data prepare`")
            for field in schema:
                digest.update(field.name.encode() + b"\x00")
                if not pa.types.is_integer(field.type):
                    _hash_strings(digest, rows, lambda p=path, n=field.name: column_batches(p, n, batch_rows))
                    continue
                digest.update(rows.to_bytes(8, "little"))
                start = 0
                for batch in column_batches(path, field.name, batch_rows):
                    if batch.null_count:
                        raise DsmdError(f"{where}: canonical tables must not hold nulls; rerun `dsmd data prepare`")
                    values = batch.cast(pa.int64()).to_numpy()
                    if field.name in rules:
                        rules[field.name](values, start)
                    digest.update(values.astype("<i8").tobytes())
                    start += len(values)
            checks.num_images = counts[0]
    except (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DsmdError(f"{where}: cannot read the canonical tables ({exc}); rerun `dsmd data prepare`") from None
    return digest.hexdigest(), counts[0], counts[1]
