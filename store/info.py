"""`dsmd store info`: what a store holds, where it came from, and how far its extraction got."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from store.reader import open_store
from store.remote import store_location


def store_info(path: str | Path) -> dict:
    """A JSON-ready description: store-wide facts, and per array its shape, dtype, shards complete/total,
    valid and skipped rows (with reasons counted) and the teacher's provenance."""
    path = store_location(path)
    with open_store(path) as reader:
        size = reader.size_on_disk()
        arrays = []
        for teacher, kind in reader.arrays():
            attrs = reader.attrs(teacher, kind)
            marks = reader.marks(teacher, kind)
            skipped = reader.skipped(teacher, kind)
            rows_done = sum(mark.stop - mark.start for mark in marks.values())
            arrays.append(
                {
                    "teacher": teacher,
                    "kind": kind,
                    "row_space": attrs["row_space"],
                    "shape": list(reader.shape(teacher, kind)),
                    "dtype": attrs["dtype"],
                    "normalisation": attrs.get("normalisation"),
                    "shards_complete": len(marks),
                    "shards_total": reader.layout.num_shards(kind),
                    "rows_complete": rows_done,
                    "valid_rows": sum(mark.valid_count for mark in marks.values()),
                    "skipped_rows": len(skipped),
                    "skipped_reasons": dict(Counter(skipped.values()).most_common()),
                    "skipped_first": {str(row): why for row, why in list(skipped.items())[:20]},
                    "created_at": attrs.get("created_at"),
                    "store_libs": attrs.get("store_libs"),
                    "provenance": attrs["provenance"],
                }
            )
        return {
            "path": str(path),
            "backend": reader.backend,
            "size_bytes": size,
            "store": dict(reader.root),
            "teachers": reader.teachers(),
            "arrays": arrays,
        }
