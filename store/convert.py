"""`dsmd store convert SRC DST`: copy a store into the other backend (or another shard size), exactly.

Rows are copied in the stored dtype (no re-rounding), with their valid flags, skip reasons and the teachers'
provenance. Only completed source shards are copied; rerunning the command resumes an interrupted copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.backends import detect_backend, writer_lease
from store.errors import StoreError
from store.reader import open_store
from store.remote import StoreUrl, store_location
from store.writer import FeatureStore


@dataclass
class ConvertSummary:
    backend: str
    arrays: int
    shards_written: int
    shards_left: int  # destination shards whose source rows are not complete yet


def convert_store(
    src: str | Path,
    dst: str | Path,
    *,
    backend: str = "auto",
    rows_per_shard: int | None = None,
    rows_per_chunk: int | None = None,
    on_shard: Callable[[str, str, int], None] | None = None,
) -> ConvertSummary:
    src, dst = store_location(src), store_location(dst)
    if _resolved(src) == _resolved(dst):
        raise StoreError(f"convert: source and destination are the same path ({src})")
    dst_backend = detect_backend(dst, backend)
    written = left = 0
    with writer_lease(dst, "dsmd store convert") as lease, open_store(src) as reader:
        layout = reader.layout
        with FeatureStore.create_or_open(
            dst,
            backend=dst_backend,
            dataset_fingerprint=reader.dataset_fingerprint,
            n_images=layout.n_images,
            n_captions=layout.n_captions,
            rows_per_shard=rows_per_shard or layout.rows_per_shard,
            rows_per_chunk=rows_per_chunk or layout.rows_per_chunk,
            dataset_name=reader.dataset_name,
            lease=lease,
        ) as writer:
            for teacher, kind in reader.arrays():
                attrs = reader.attrs(teacher, kind)
                writer.ensure_array(teacher, kind, attrs["dim"], attrs["dtype"], attrs["provenance"],
                                    views=attrs.get("views"), normalisation=attrs.get("normalisation", "l2"))
                src_done = set(reader.marks(teacher, kind))
                skipped = reader.skipped(teacher, kind)
                for shard in writer.pending_shards(teacher, kind):
                    start, stop = writer.shard_rows(teacher, kind, shard)
                    first, last = start // layout.rows_per_shard, (stop - 1) // layout.rows_per_shard
                    if not set(range(first, last + 1)) <= src_done:
                        left += 1
                        continue
                    rows = reader.get(teacher, kind, np.arange(start, stop), dtype=None)
                    shard_skipped = {row: why for row, why in skipped.items() if start <= row < stop}
                    mark = writer.write_shard(teacher, kind, shard, rows, skipped=shard_skipped)
                    _check_same_rows(reader, teacher, kind, mark, layout.rows_per_shard, dst)
                    written += 1
                    if on_shard is not None:
                        on_shard(teacher, kind, shard)
            return ConvertSummary(writer.backend, len(reader.arrays()), written, left)


def _resolved(path: Path | StoreUrl) -> str:
    return str(path) if isinstance(path, StoreUrl) else str(path.resolve())


def _check_same_rows(reader, teacher: str, kind: str, mark, src_rows_per_shard: int, dst: Path) -> None:
    """With the same shard size, a copied shard must have its source's checksum, byte for byte."""
    if mark.stop - mark.start and mark.start % src_rows_per_shard == 0:
        source = reader.marks(teacher, kind).get(mark.start // src_rows_per_shard)
        if source is not None and (source.start, source.stop) == (mark.start, mark.stop):
            if source.data_sha256 != mark.data_sha256:
                raise StoreError(
                    f"convert: {teacher}/{kind} shard {mark.shard} in {dst} differs from its source; "
                    "run dsmd store verify on the source"
                )
