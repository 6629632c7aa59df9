"""Fill shards of the feature store with one teacher. The same code runs in-process and on a Dask worker.

A worker owns whole shards: it encodes every row of a shard, then writes the shard and its completion mark in
one call, so a kill loses at most the shard in flight and a rerun redoes only unfinished shards.

A shard's contents depend on the shard alone: image batches never straddle two shards and caption batches are
formed inside a shard, so a resumed run, a Dask run and an uninterrupted run write the same rows.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config, replace_settings
from pipeline.data.bucket import local_shard_cache
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.check import load_bad_images
from pipeline.errors import DsmdError
from pipeline.models.teachers import Teacher, load_teacher, resolve_device, resolve_precision
from stages.extract.batches import ViewCrops, image_batches
from stages.extract.plan import (
    BOX_KIND,
    KINDS,
    TRAIN_ONLY,
    UNSELECTED,
    VIEW_KIND,
    ShardTask,
    open_store,
    plan_shards,
    selected_rows,
)
from store import FeatureStore
from store.writer import Lease

__all__ = [
    "KINDS",
    "ExtractWorker",
    "FillResult",
    "cpu_threads",
    "dsmd_version",
    "extraction_provenance",
    "fill_on_worker",
    "open_store",
    "prepare_arrays",
    "worker_device",
    "resolve_device",
    "resolve_precision",
]


@dataclass
class FillResult:
    rows_encoded: int = 0  # rows that went through the teacher (bad images included)
    rows_written: int = 0  # rows of the shards written (rows of unselected splits included)
    shards: list[ShardTask] = field(default_factory=list)
    # kind -> row -> reason, for the rows skipped in the shards written here
    skipped: dict[str, dict[int, str]] = field(default_factory=lambda: {kind: {} for kind in (*KINDS, VIEW_KIND)})
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    view_seconds: float = 0.0  # of seconds, making and writing view shards


def dsmd_version() -> str:
    try:
        return version("dsmd")
    except PackageNotFoundError:
        return "unknown"


def cpu_threads(setting: int, loader_workers: int, processes_on_host: int = 1) -> int:
    """Torch CPU threads for one extraction process: the setting, or (0) this process's share of the cores
    minus its decoding workers. More threads than free cores makes OpenMP spin against itself."""
    if setting > 0:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes_on_host) - loader_workers)


def worker_device(setting: str, local_index: int = 0) -> str:
    """The device of the local_index-th extraction process on a host: one GPU each, round robin, when the
    setting is auto or cuda and the host has GPUs (cuda:N and cpu are taken as given)."""
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_index % torch.cuda.device_count()}"
    return setting


def checked_device(name: str | torch.device) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DsmdError(f"extract.device {str(name)!r}: no CUDA GPU is visible here; use extract.device=cpu or auto")
    return device


def extraction_provenance(cfg: Config, teacher: Teacher, ds: CanonicalDataset, precision: str | None = None) -> dict:
    """How the features are made; a resumed or parallel run must match it exactly. extract.splits is not part
    of it: which rows a run left out is recorded per row (skip reason), and a later run may add them."""
    return {
        "teacher": teacher.provenance(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint},
        "extraction": {
            "precision": precision or teacher.precision,
            "normalisation": "L2 after the teacher's retrieval head, recomputed in float32",
        },
        "dsmd_version": dsmd_version(),
    }


def prepare_arrays(cfg: Config, teacher: Teacher, ds: CanonicalDataset, store: FeatureStore, precision: str):
    """Create (or check) the teacher's arrays; idempotent and race-safe, so every worker calls it."""
    provenance = extraction_provenance(cfg, teacher, ds, precision)
    for kind in KINDS:
        store.ensure_array(cfg.teacher.name, kind, teacher.dim, dtype=cfg.extract.dtype, provenance=provenance)
    k = cfg.extract.views
    if k > 0:
        provenance = {**provenance, "views": view_provenance(cfg)}
        name = cfg.teacher.name
        store.ensure_array(name, VIEW_KIND, k * teacher.dim, dtype=cfg.extract.dtype, provenance=provenance, views=k)
        # Boxes are pixel coordinates: float32 holds every integer below 2**24 exactly, float16 would not.
        store.ensure_array(name, BOX_KIND, 4 * k, dtype="float32", provenance=provenance, views=k,
                           normalisation="none")


def view_provenance(cfg: Config) -> dict:
    """How the views are drawn: a change makes other boxes, so a store with other views is refused."""
    ex = cfg.extract
    return {
        "k": ex.views,
        "seed": ex.view_seed,
        "min_scale": ex.view_min_scale,
        "ratio": [3 / 4, 4 / 3],
        "boxes": "pipeline.data.views.draw_boxes: per (seed, image id, view), x0 y0 x1 y1 in the decoded image",
        "then": "the teacher's image transform on the crop",
    }


def _to_numpy(embeddings: torch.Tensor) -> np.ndarray:
    # bf16 outputs are a little off the unit sphere; the store promises unit norm, so renormalise in fp32.
    return F.normalize(embeddings.float(), dim=-1).cpu().numpy()


class ExtractWorker:
    """Holds the teacher, the dataset and the store for a run of shards. Close it (or use `with`)."""

    def __init__(self, cfg: Config, device: str | None = None, teacher: Teacher | None = None,
                 lease: Lease | None = None):
        self.cfg = cfg
        self.device = checked_device(device or cfg.extract.device)
        self.ds = CanonicalDataset.load(cfg.data.canonical_dir)
        # Extraction reads images in id order, so shards in a bucket come whole through the local cache.
        self.ds.use_shard_cache(local_shard_cache(cfg.extract.cache_dir, cfg.extract.cache_gb), in_order=True)
        self.selected = selected_rows(self.ds, cfg.extract.splits, cfg.extract.views)
        self.known_bad = load_bad_images(cfg.data.canonical_dir)
        self.teacher = teacher or load_teacher(cfg.teacher, device=self.device, precision=cfg.extract.precision)
        self.precision = self.teacher.precision
        self.store = open_store(cfg, self.ds, lease)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ExtractWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self) -> None:
        prepare_arrays(self.cfg, self.teacher, self.ds, self.store, self.precision)

    def plan(self) -> list[ShardTask]:
        return plan_shards(self.store, self.cfg.teacher.name, self.selected)

    def fill(self, tasks: Sequence[ShardTask], on_rows: Callable[[int], None] | None = None) -> FillResult:
        """Write the given shards, except those finished meanwhile (a Dask task retried after its worker died)."""
        result = FillResult()
        started = time.perf_counter()
        still = {task.key: task for task in self.plan()}
        tasks = [still[task.key] for task in tasks if task.key in still]
        image_tasks = [task for task in tasks if task.kind == "image"]
        if image_tasks:
            self._fill_images(image_tasks, result, on_rows)
        for task in tasks:
            if task.kind == "text":
                self._fill_text(task, result, on_rows)
        view_tasks = [task for task in tasks if task.kind == VIEW_KIND]
        if view_tasks:
            self._fill_views(view_tasks, result, on_rows)
        result.seconds = time.perf_counter() - started
        return result

    # -- shards ---------------------------------------------------------------------------------------
    def _shard(self, task: ShardTask) -> tuple[int, int, np.ndarray, np.ndarray, dict[int, str]]:
        """(start, stop, selected row ids, zero values, skips of the unselected rows) of a shard to fill."""
        start, stop = self.store.shard_rows(self.cfg.teacher.name, task.kind, task.shard)
        chosen = self.selected[task.kind][start:stop]
        ids = start + np.flatnonzero(chosen)
        skipped = dict.fromkeys((start + np.flatnonzero(~chosen)).tolist(), UNSELECTED)
        return start, stop, ids, np.zeros((stop - start, self.teacher.dim), np.float32), skipped

    def _write(self, task: ShardTask, values: np.ndarray, skipped: dict[int, str], result: FillResult) -> None:
        start, _ = self.store.shard_rows(self.cfg.teacher.name, task.kind, task.shard)
        valid = np.ones(len(values), bool)
        valid[np.fromiter(skipped, np.int64, len(skipped)) - start] = False
        self.store.write_shard(
            self.cfg.teacher.name, task.kind, task.shard, values, valid=valid, skipped=skipped, overwrite=task.redo
        )
        result.rows_written += len(values)
        result.skipped[task.kind].update(skipped)
        result.shards.append(task)

    def _fill_images(self, tasks: list[ShardTask], result: FillResult, on_rows) -> None:
        size = self.cfg.extract.image_batch_size
        shards = [self._shard(task) for task in tasks]
        batch_ids = [ids[i : i + size].tolist() for _, _, ids, _, _ in shards for i in range(0, len(ids), size)]
        batches = iter(image_batches(
            batch_ids,
            self.ds.image_source,
            self.teacher.image_transform,
            workers=self.cfg.extract.loader_workers,
            known_bad=self.known_bad,
            pin_memory=self.device.type == "cuda",
        ))
        for task, (start, _, ids, values, skipped) in zip(tasks, shards, strict=True):
            for _ in range(0, len(ids), size):
                batch = next(batches)
                local = batch.ids.numpy() - start
                ok = batch.ok.numpy()
                if ok.any():
                    values[local[ok]] = _to_numpy(self.teacher.encode_images(batch.pixels))
                _record_skips(batch, ok, skipped)
                result.rows_encoded += len(local)
                if on_rows:
                    on_rows(len(local))
            self._write(task, values, skipped, result)

    def _fill_views(self, tasks: list[ShardTask], result: FillResult, on_rows) -> None:
        """K crops of every selected training image through the teacher; per shard the boxes, then the rows.
        Batches hold image_batch_size images (K times as many crops) and never straddle shards, as for images."""
        ex, name, dim = self.cfg.extract, self.cfg.teacher.name, self.teacher.dim
        k, size = ex.views, ex.image_batch_size
        train = np.zeros(self.ds.num_images, bool)
        train[self.ds.image_ids("train")] = True
        shards = []
        for task in tasks:
            start, stop = self.store.shard_rows(name, VIEW_KIND, task.shard)
            chosen = self.selected[VIEW_KIND][start:stop]
            left = start + np.flatnonzero(~chosen)
            skipped = {row: UNSELECTED if train[row] else TRAIN_ONLY for row in left.tolist()}
            shards.append((start, start + np.flatnonzero(chosen), skipped))
        batch_ids = [ids[i : i + size].tolist() for _, ids, _ in shards for i in range(0, len(ids), size)]
        batches = iter(image_batches(
            batch_ids,
            self.ds.image_source,
            self.teacher.image_transform,
            workers=ex.loader_workers,
            known_bad=self.known_bad,
            pin_memory=self.device.type == "cuda",
            views=ViewCrops(self.teacher.image_transform, k, ex.view_seed, ex.view_min_scale),
        ))
        for task, (start, ids, skipped) in zip(tasks, shards, strict=True):
            started = time.perf_counter()
            rows = np.zeros((self.store.shard_rows(name, VIEW_KIND, task.shard)[1] - start, k * dim), np.float32)
            boxes = np.zeros((len(rows), 4 * k), np.float32)
            for _ in range(0, len(ids), size):
                batch = next(batches)
                local = batch.ids.numpy() - start
                ok = batch.ok.numpy()
                if ok.any():
                    # The crops go through the teacher image_batch_size at a time, as plain images do.
                    encoded = np.concatenate([
                        _to_numpy(self.teacher.encode_images(batch.pixels[i : i + size]))
                        for i in range(0, len(batch.pixels), size)
                    ])
                    rows[local[ok]] = encoded.reshape(-1, k * dim)
                    boxes[local[ok]] = batch.boxes.numpy().reshape(-1, 4 * k)
                _record_skips(batch, ok, skipped)
                result.rows_encoded += len(local)
                if on_rows:
                    on_rows(len(local))
            valid = np.ones(len(rows), bool)
            valid[np.fromiter(skipped, np.int64, len(skipped)) - start] = False
            # Boxes first (rewritten whole if a killed run left them marked), the rows' mark last.
            self.store.write_shard(name, BOX_KIND, task.shard, boxes, valid=valid, skipped=skipped, overwrite=True)
            seconds = time.perf_counter() - started
            self.store.write_shard(name, VIEW_KIND, task.shard, rows, valid=valid, skipped=skipped,
                                   overwrite=task.redo, seconds=seconds)
            result.view_seconds += seconds
            result.rows_written += len(rows)
            result.skipped[VIEW_KIND].update(skipped)
            result.shards.append(task)

    def _fill_text(self, task: ShardTask, result: FillResult, on_rows) -> None:
        start, _, ids, values, skipped = self._shard(task)
        texts = self.ds.texts(ids)
        # Captions of similar length batched together: the teacher trims the padding every caption of a batch
        # shares, so sorting by length cuts the positions it encodes (by about 40% on the demo captions).
        order = np.argsort(np.fromiter(map(len, texts), np.int64, len(texts)), kind="stable")
        size = self.cfg.extract.text_batch_size
        for offset in range(0, len(order), size):
            part = order[offset : offset + size]
            tokens = self.teacher.tokenize([texts[i] for i in part])
            values[ids[part] - start] = _to_numpy(self.teacher.encode_texts(tokens))
            result.rows_encoded += len(part)
            if on_rows:
                on_rows(len(part))
        self._write(task, values, skipped, result)


def fill_on_worker(cfg: Config, tasks: list[ShardTask], local_index: int = 0, processes_on_host: int = 1,
                   lease: Lease | None = None) -> FillResult:
    """Entry point of a Dask task: load everything on the worker, fill the shards it owns.

    local_index: this worker's rank among the processes_on_host workers on its host (picks its GPU). lease: the
    fence of the driver's S3 writer lease (store/s3_lease.py): the worker checks it before every shard and
    mark, and stops once the driver has lost the store to another writer or stopped renewing its lease."""
    notes = []
    if cfg.extract.loader_workers > 0 and multiprocessing.current_process().daemon:
        # A daemonic process may not start children, so no DataLoader workers here.
        cfg = replace_settings(cfg, extract=replace(cfg.extract, loader_workers=0))
        notes.append(
            "a daemonic Dask worker decoded images itself (extract.loader_workers ignored); start the workers "
            "with distributed.worker.daemon: false to decode in parallel"
        )
    # The worker process is ours for the task: split the host's cores between the workers on it.
    torch.set_num_threads(cpu_threads(cfg.extract.cpu_threads, cfg.extract.loader_workers, processes_on_host))
    with ExtractWorker(cfg, device=worker_device(cfg.extract.device, local_index), lease=lease) as worker:
        worker.prepare()  # creates the arrays, or checks that this worker makes the same features
        result = worker.fill(tasks)
    result.notes += notes
    return result


def _record_skips(batch, ok: np.ndarray, skipped: dict[int, str]) -> None:
    """The rows of ``batch`` whose image could not be used, with the loader's reason."""
    if not ok.all():
        for row, good, reason in zip(batch.ids.tolist(), ok.tolist(), batch.reasons, strict=True):
            if not good:
                skipped[row] = reason
