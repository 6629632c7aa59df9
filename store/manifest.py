"""A store's manifest: a small local JSON file that stands for a store DVC cannot track itself (one on S3).

DVC 3 refuses cached outputs outside the project ("Cached output(s) outside of DVC project"), and an uncached
s3:// output is hashed by reading every object of it on each `dvc status`. The manifest holds instead what
decides the store's contents: its URL, dataset fingerprint and layout, and per array the stable provenance
and a digest of every shard's completion mark (which holds the shard's sha256), plus each extra's checksum. It
is written only from marks and metadata (no shard is read), with sorted keys and no times, so an unchanged
store gives the same bytes and DVC reruns the stages downstream exactly when a shard, an array or an extra
changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from store.errors import StoreError
from store.extras import get_extra, list_extras
from store.layout import stable_provenance
from store.marks import ShardMark
from store.reader import open_store

MANIFEST_FORMAT = "dsmd-store-manifest"
MANIFEST_VERSION = 1
# When and how long a shard took do not change what it holds.
_VOLATILE_MARK_FIELDS = ("written_at", "seconds")


def mark_digest(mark: ShardMark) -> str:
    body = {k: v for k, v in dataclasses.asdict(mark).items() if k not in _VOLATILE_MARK_FIELDS}
    body["skipped"] = {str(row): why for row, why in sorted(mark.skipped.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def store_manifest(store: str | Path) -> dict:
    """The manifest of the store at `store` (a local path or an s3:// URL)."""
    with open_store(store) as reader:
        arrays = {}
        for teacher, kind in reader.arrays():
            attrs = reader.attrs(teacher, kind)
            marks = reader.marks(teacher, kind)
            arrays[f"{teacher}/{kind}"] = {
                "dim": attrs["dim"],
                "dtype": attrs["dtype"],
                "views": attrs.get("views"),
                "normalisation": attrs.get("normalisation", "l2"),
                "provenance": stable_provenance(attrs.get("provenance") or {}),
                "shards": reader.layout.num_shards(kind),
                "shards_done": len(marks),
                "marks": {str(shard): mark_digest(mark) for shard, mark in sorted(marks.items())},
            }
        body = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "store": str(store),
            "dataset_name": reader.dataset_name,
            "dataset_fingerprint": reader.dataset_fingerprint,
            "layout": reader.layout.to_dict(),
            "arrays": arrays,
        }
    extras = {}
    for name in list_extras(store):
        extra = get_extra(store, name)
        extras[name] = {"sha256": extra.record.get("sha256"), "provenance": stable_provenance(extra.provenance)}
    body["extras"] = extras
    return body


def write_manifest(store: str | Path, target: Path) -> dict:
    """Write the store's manifest to `target` (atomically: a killed run leaves the old one or the new one)."""
    body = store_manifest(store)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    os.replace(partial, target)
    return body


def read_manifest(target: Path) -> dict:
    try:
        body = json.loads(target.read_text())
    except FileNotFoundError:
        raise StoreError(f"{target}: no store manifest there; run `dsmd extract` (or `dvc repro extract`)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{target}: cannot read this store manifest ({exc}); run `dsmd extract` again") from None
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise StoreError(f"{target} is not a dsmd store manifest; point extract.tracked at another file")
    return body
