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
from store.writer import Lease

KINDS = ("image", "text")
# extract.views > 0: one task kind writes a shard of the view rows and of their boxes (the boxes first, the
# rows' mark last, so the shard counts as done only once both are there).
VIEW_KIND, BOX_KIND = "image_view", "image_view_box"
# The skip reason of rows left out by extract.splits (text and image rows alike).
UNSELECTED = "split not selected for extraction"
# The skip reason of the view rows of val / test images: distill trains on train only, and validates plain.
TRAIN_ONLY = "views are made for training images only"


@dataclass(frozen=True)
class ShardTask:
    kind: str  # "image" | "text"
    shard: int
    # Complete, but with rows of a split selected since: rewrite it (overwrite its mark).
    redo: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.shard


def open_store(cfg: Config, ds: CanonicalDataset, lease: Lease | None = None) -> FeatureStore:
    """The run's store: created on first use, else checked to be for this dataset and shard layout. `lease`: the
    run's writer lease (or, on a Dask worker, its fence), checked before every shard and mark."""
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
        lease=lease,
    )


def check_splits(splits: Sequence[str]) -> list[str]:
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DsmdError(
            f"extract.splits {list(splits)!r}: give one or more of {', '.join(SPLITS)}"
            + (f" ({unknown[0]!r} is not a split)" if unknown else "")
        )
    return list(dict.fromkeys(splits))


def selected_rows(ds: CanonicalDataset, splits: Sequence[str], views: int = 0) -> dict[str, np.ndarray]:
    """Bool per row of each kind: does its split (the image's split, for captions) take part in this run. With
    views, also the image rows that get views: the selected training images."""
    wanted = check_splits(splits)
    image = np.zeros(ds.num_images, bool)
    text = np.zeros(ds.num_captions, bool)
    for split in wanted:
        image[ds.image_ids(split)] = True
        text[ds.caption_ids(split)] = True
    selected = {"image": image, "text": text}
    if views > 0:
        train = np.zeros(ds.num_images, bool)
        train[ds.image_ids("train")] = True
        selected[VIEW_KIND] = image & train
    return selected


def run_kinds(selected: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The task kinds of a run: image and text, and the views when extract.views > 0."""
    return KINDS + ((VIEW_KIND,) if VIEW_KIND in selected else ())


def plan_shards(store: FeatureStore, teacher: str, selected: dict[str, np.ndarray]) -> list[ShardTask]:
    """The shards this run must write, image shards first, each kind in shard order."""
    present = set(store.arrays())
    rows_per_shard = store.layout.rows_per_shard
    tasks: list[ShardTask] = []
    for kind in run_kinds(selected):
        shards = range(store.num_shards(kind))
        if (teacher, kind) not in present or (kind == VIEW_KIND and (teacher, BOX_KIND) not in present):
            tasks += [ShardTask(kind, shard) for shard in shards]  # a new array: everything
            continue
        pending = set(store.pending_shards(teacher, kind))
        if kind == VIEW_KIND:
            pending |= set(store.pending_shards(teacher, BOX_KIND))
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
