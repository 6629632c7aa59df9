"""Prepare a WebDataset source shard by shard, in memory bounded by one shard whatever the dataset's size.

Each shard's rows (pipeline/data/webdataset.py) get their global ids and are appended to the three Parquet files
as they come; nothing of an earlier shard stays in memory but counters and, per image, a 64-bit hash of its key
in `SpilledGroups` (which goes to disk past 65k). Once every shard is read:
- keys seen twice are found by grouping those hashes; an equal hash is confirmed on the keys themselves (read
  back from the file) before the dataset is refused, naming both shards;
- the fingerprint is computed from the files a batch at a time (`fingerprint_files`, the same value as the
  tables in memory would give), which also checks the tables' invariants;
- the files are moved into place, dataset.json last (`files.commit`).
The rows come out exactly as the in-memory readers would order them: images and captions in shard order, then
sample order.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.files import CAPTIONS_FILE, IMAGES_FILE, TAR_INDEX_FILE, commit, make_card, staged_path
from pipeline.data.fingerprint import column_batches, fingerprint_files
from pipeline.data.rows import CAPTIONS_SCHEMA, IMAGES_SCHEMA, SPLITS
from pipeline.data.shards import TAR_INDEX_SCHEMA, shards_metadata
from pipeline.data.spill import BUFFER_ROWS, SpilledGroups
from pipeline.data.webdataset import ShardRows, WebDatasetSummary
from pipeline.errors import DsmdError

__all__ = ["write_streamed"]

# Rows gathered before a Parquet row group is written. A reader decodes a column's row group at once, so this
# bounds its memory: an img2dataset shard (10k samples) is one row group; tests' tiny shards are gathered.
_ROW_GROUP = 1 << 13
_KEY_RECORD = np.dtype([("hash", "<u8"), ("image_id", "<i8"), ("shard", "<i4")])


def _key_hashes(keys: list[str]) -> np.ndarray:
    digests = b"".join(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest() for key in keys)
    return np.frombuffer(digests, dtype="<u8")


class _TableFile:
    """One canonical table written a row group at a time to its staged path."""

    def __init__(self, path: Path, schema: pa.Schema, row_group: int):
        self.path = path
        self.row_group = row_group
        self.writer = pq.ParquetWriter(path, schema)
        self.pending: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if sum(t.num_rows for t in self.pending) >= self.row_group:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending))
            self.pending = []

    def close(self, metadata: dict[str, str] | None = None) -> None:
        self.flush()
        if metadata:
            self.writer.add_key_value_metadata(metadata)
        self.writer.close()


class _Counts:
    def __init__(self):
        self.images: Counter = Counter()
        self.captions: Counter = Counter()

    def add(self, images: pa.Table, captions: pa.Table) -> None:
        for counter, table in ((self.images, images), (self.captions, captions)):
            counts = table.column("split").value_counts().to_pylist()
            counter.update({item["values"]: item["counts"] for item in counts})

    def card(self, dropped: int) -> dict:
        return {
            "images": sum(self.images.values()),
            "captions": sum(self.captions.values()),
            "splits": {s: {"images": self.images[s], "captions": self.captions[s]} for s in SPLITS},
            "dropped_rows": dropped,
        }


def _offset(table: pa.Table, columns: dict[str, int]) -> pa.Table:
    for name, by in columns.items():
        position = table.schema.get_field_index(name)
        shifted = np.asarray(table.column(name).to_numpy(), dtype=np.int64) + by
        table = table.set_column(position, name, pa.array(shifted, pa.int64()))
    return table


def write_streamed(shards, directory: Path, *, name: str, source: Path | str, images_root: Path | str, info: dict,
                   row_group: int = _ROW_GROUP, spill_rows: int = BUFFER_ROWS) -> dict:
    """Write the canonical directory from ``shards`` (an iterator of `ShardRows`); returns the card written.
    ``row_group``: rows per Parquet row group; ``spill_rows``: key hashes held before they go to disk."""
    staged = {file: staged_path(directory, file) for file in (IMAGES_FILE, CAPTIONS_FILE, TAR_INDEX_FILE)}
    files = {file: _TableFile(staged[file], schema, row_group) for file, schema in (
        (IMAGES_FILE, IMAGES_SCHEMA), (CAPTIONS_FILE, CAPTIONS_SCHEMA), (TAR_INDEX_FILE, TAR_INDEX_SCHEMA))}
    summary, counts, dropped = WebDatasetSummary(), _Counts(), []
    shard_list: list[dict] = []
    try:
        with SpilledGroups(_KEY_RECORD, directory, buffer_rows=spill_rows) as keys:
            for shard in shards:
                _add_shard(shard, len(shard_list), files, keys, counts)
                shard_list.append({"path": shard.path, "size": shard.size,
                                   **({"sha256": shard.sha256} if shard.sha256 else {})})
                summary.add(shard)
                dropped.extend(row.to_dict() for row in shard.builder.dropped)
            for file in (IMAGES_FILE, CAPTIONS_FILE):
                files[file].close()
            files[TAR_INDEX_FILE].close(shards_metadata(shard_list))
            if files[IMAGES_FILE].rows == 0:
                raise DsmdError(f"{source}: no images found; is this the right file and format?")
            _refuse_repeated_keys(keys, staged[IMAGES_FILE], shard_list, source)
        fingerprint, _, _ = fingerprint_files(staged[IMAGES_FILE], staged[CAPTIONS_FILE], str(directory))
        info = {**info, "dropped": dropped, "webdataset": summary.to_dict()}
        card = make_card(name, images_root, fingerprint, counts.card(len(dropped)), info)
        commit(directory, staged, card)
        return card
    finally:
        for file in files.values():
            if file.writer.is_open:
                file.writer.close()
        for path in staged.values():
            path.unlink(missing_ok=True)


def _add_shard(shard: ShardRows, number: int, files: dict, keys: SpilledGroups, counts: _Counts) -> None:
    builder = shard.builder
    if not builder.keys:
        return  # every sample of the shard was dropped (no image member)
    first_image, first_caption = files[IMAGES_FILE].rows, files[CAPTIONS_FILE].rows
    images, captions = builder.tables()
    images = _offset(images, {"image_id": first_image})
    captions = _offset(captions, {"caption_id": first_caption, "image_id": first_image})
    n = images.num_rows
    tar_rows = pa.table({
        "image_id": pa.array(np.arange(first_image, first_image + n, dtype=np.int64)),
        "shard": pa.array(np.full(n, number, dtype=np.int32)),
        "member": pa.array(shard.members, pa.string()),
        "offset": pa.array(np.frombuffer(shard.offsets, dtype=np.int64)),
        "size": pa.array(np.frombuffer(shard.sizes, dtype=np.int64)),
    }, schema=TAR_INDEX_SCHEMA)
    files[IMAGES_FILE].add(images)
    files[CAPTIONS_FILE].add(captions)
    files[TAR_INDEX_FILE].add(tar_rows)
    counts.add(images, captions)
    records = np.empty(n, _KEY_RECORD)
    records["hash"] = _key_hashes(builder.keys)
    records["image_id"] = np.arange(first_image, first_image + n)
    records["shard"] = number
    keys.add(records)


def _refuse_repeated_keys(keys: SpilledGroups, images_file: Path, shard_list: list[dict], source: Path) -> None:
    """Refuse a key that two images share. Hashes only point at candidates; the keys themselves decide."""
    candidates: dict[int, int] = {}  # image id -> shard
    for records in keys.groups():
        hashes = records["hash"]
        repeated = np.zeros(len(records), dtype=bool)
        repeated[1:] |= hashes[1:] == hashes[:-1]
        repeated[:-1] |= hashes[:-1] == hashes[1:]
        candidates.update(zip(records["image_id"][repeated].tolist(), records["shard"][repeated].tolist(),
                              strict=True))
    if not candidates:
        return
    wanted = np.fromiter(candidates, dtype=np.int64)
    first_seen: dict[str, int] = {}
    start = 0
    for batch in column_batches(images_file, "key"):
        ids = np.arange(start, start + len(batch))
        for image_id in ids[np.isin(ids, wanted)].tolist():
            key = batch[image_id - start].as_py()
            if key in first_seen:
                earlier, later = shard_list[candidates[first_seen[key]]], shard_list[candidates[image_id]]
                raise DsmdError(
                    f"{source}, shard {later['path']}, sample {key!r}: image id {key!r} appears twice (first in "
                    f"shard {earlier['path']}); image ids must be unique"
                )
            first_seen[key] = image_id
        start += len(batch)
