"""Which shards a run of `dsmd extract` has to (re)write. numpy only: the Dask client plans without torch.

A shard is work when it has no completion mark, or when it is complete but holds rows skipped as "split not
selected" whose split is selected now (extract.splits was widened): such a shard is rewritten whole. Narrowing
extract.splits never throws finished features away: the rows already there stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.rows import SPLITS
from pipeline.errors import DsmdError
from store import FeatureStore

KINDS = ("image", "text")
# The skip reason of rows left out by extract.splits (text and image rows alike).
UNSELECTED = "split not selected for extraction"


@dataclass(frozen=True)
class ShardTask:
    kind: str  # "image" | "text"
    shard: int
    # Complete, but with rows of a split selected since: rewrite it (overwrite its mark).
    redo: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.shard


def open_store(cfg: Config, ds: CanonicalDataset) -> FeatureStore:
    """The run's store: created on first use, else checked to be for this dataset and shard layout."""
    ex = cfg.extract
    return FeatureStore.create_or_open(
        ex.store,
        backend=ex.backend,
        dataset_fingerprint=ds.fingerprint,
        n_images=ds.num_images,
        n_captions=ds.num_captions,
        dataset_name=ds.name,
        rows_per_shard=ex.rows_per_shard,
        rows_per_chunk=ex.rows_per_chunk,
    )


def check_splits(splits: Sequence[str]) -> list[str]:
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DsmdError(
            f"extract.splits {list(splits)!r}: give one or more of {', '.join(SPLITS)}"
            + (f" ({unknown[0]!r} is not a split)" if unknown else "")
        )
    return list(dict.fromkeys(splits))


def selected_rows(ds: CanonicalDataset, splits: Sequence[str]) -> dict[str, np.ndarray]:
    """Bool per row of each kind: does its split (the image's split, for captions) take part in this run."""
    wanted = check_splits(splits)
    image = np.zeros(ds.num_images, bool)
    text = np.zeros(ds.num_captions, bool)
    for split in wanted:
        image[ds.image_ids(split)] = True
        text[ds.caption_ids(split)] = True
    return {"image": image, "text": text}


def plan_shards(store: FeatureStore, teacher: str, selected: dict[str, np.ndarray]) -> list[ShardTask]:
    """The shards this run must write, image shards first, each kind in shard order."""
    present = set(store.arrays())
    rows_per_shard = store.layout.rows_per_shard
    tasks: list[ShardTask] = []
    for kind in KINDS:
        shards = range(store.num_shards(kind))
        if (teacher, kind) not in present:  # a new array: everything
            tasks += [ShardTask(kind, shard) for shard in shards]
            continue
        pending = set(store.pending_shards(teacher, kind))
        skipped = store.skipped(teacher, kind)
        left_out = np.fromiter((row for row, reason in skipped.items() if reason == UNSELECTED), np.int64)
        widened = set((left_out[selected[kind][left_out]] // rows_per_shard).tolist())
        tasks += [ShardTask(kind, shard, redo=shard not in pending) for shard in shards
                  if shard in pending or shard in widened]
    return tasks


def selected_count(store: FeatureStore, tasks: Sequence[ShardTask], selected: dict[str, np.ndarray]) -> int:
    """Rows the teacher will encode for these tasks (the progress bar's total)."""
    total = 0
    for task in tasks:
        start, stop = store.layout.shard_rows(task.kind, task.shard)
        total += int(selected[task.kind][start:stop].sum())
    return total
