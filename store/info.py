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
            if attrs.get("views") is not None:
                arrays[-1]["views"] = attrs["views"]
            timed = [mark.seconds for mark in marks.values() if mark.seconds is not None]
            if timed:
                arrays[-1]["seconds"] = round(sum(timed), 3)
        return {
            "path": str(path),
            "backend": reader.backend,
            "size_bytes": size,
            "store": dict(reader.root),
            "teachers": reader.teachers(),
            "arrays": arrays,
            "views": view_summary(arrays),
        }


def view_summary(arrays: list[dict]) -> dict:
    """Per teacher with stored views: K, the bytes one view of one image takes (its feature row and its box),
    the bytes of all views, and the seconds spent extracting them (summed over the finished shards' marks)."""
    out = {}
    by_key = {(a["teacher"], a["kind"]): a for a in arrays}
    for (teacher, kind), rows in by_key.items():
        if kind != "image_view":
            continue
        boxes = by_key.get((teacher, "image_view_box"))
        k, n = rows["views"], rows["shape"][0]
        row_bytes = rows["shape"][1] * _ITEMSIZE[rows["dtype"]]
        box_bytes = boxes["shape"][1] * _ITEMSIZE[boxes["dtype"]] if boxes else 0
        out[teacher] = {
            "views": k,
            "bytes_per_view": (row_bytes + box_bytes) // k,  # per image
            "bytes_total": (row_bytes + box_bytes) * n,
            "extract_seconds": rows.get("seconds", 0.0),
            "valid_images": rows["valid_rows"],
        }
    return out


_ITEMSIZE = {"float16": 2, "float32": 4}
