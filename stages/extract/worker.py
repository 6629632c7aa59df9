"""Fill shards of the feature store with one teacher. The same code runs in-process and on a Dask worker.

A worker owns whole shards: it encodes every row of a shard, then writes the shard and its completion mark in
one call, so a kill loses at most the shards in flight and a rerun redoes only those.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.check import load_bad_images
from pipeline.models.teachers import Teacher, load_teacher
from stages.extract.batches import image_batches
from store import FeatureStore

KINDS = ("image", "text")


@dataclass
class FillResult:
    rows: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    shards: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def dsmd_version() -> str:
    try:
        return version("dsmd")
    except PackageNotFoundError:
        return "unknown"


def open_store(cfg: Config, ds: CanonicalDataset) -> FeatureStore:
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


def extraction_provenance(cfg: Config, teacher: Teacher, ds: CanonicalDataset, precision: str) -> dict:
    return {
        "teacher": teacher.provenance(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint},
        "extraction": {
            "precision": precision,
            "splits": list(cfg.extract.splits),
            "normalisation": "L2 after the teacher's retrieval head, recomputed in float32",
        },
        "dsmd_version": dsmd_version(),
    }


def prepare_arrays(cfg: Config, teacher: Teacher, ds: CanonicalDataset, store: FeatureStore, precision: str):
    """Create (or check) the teacher's arrays; idempotent, so every run and every worker may call it."""
    provenance = extraction_provenance(cfg, teacher, ds, precision)
    for kind in KINDS:
        store.ensure_array(cfg.teacher.name, kind, teacher.dim, dtype=cfg.extract.dtype, provenance=provenance)


def _autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16") and device.type == "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _to_numpy(embeddings: torch.Tensor) -> np.ndarray:
    # bf16 outputs are a little off the unit sphere; the store promises unit norm, so renormalise in fp32.
    return F.normalize(embeddings.float(), dim=-1).cpu().numpy()


class ExtractWorker:
    """Holds the teacher, the dataset and the store for a run of shards."""

    def __init__(self, cfg: Config, device: str | None = None, teacher: Teacher | None = None):
        self.cfg = cfg
        self.device = resolve_device(device or cfg.extract.device)
        self.precision = resolve_precision(cfg.extract.precision, self.device)
        self.ds = CanonicalDataset.load(cfg.data.canonical_dir)
        self.store = open_store(cfg, self.ds)
        self.teacher = teacher or load_teacher(cfg.teacher, device=self.device, precision=self.precision)
        self.known_bad = load_bad_images(cfg.data.canonical_dir)
        splits = set(cfg.extract.splits)
        self.image_selected = np.isin(self.ds.images.column("split").to_numpy(zero_copy_only=False), list(splits))
        self.caption_selected = np.isin(
            self.ds.captions.column("split").to_numpy(zero_copy_only=False), list(splits)
        )
        self.captions = self.ds.captions.column("text").to_pylist()

    def prepare(self) -> None:
        prepare_arrays(self.cfg, self.teacher, self.ds, self.store, self.precision)

    def pending(self) -> list[tuple[str, int]]:
        name = self.cfg.teacher.name
        return [(kind, shard) for kind in KINDS for shard in self.store.pending_shards(name, kind)]

    def fill(self, shards: list[tuple[str, int]], on_rows: Callable[[int], None] | None = None) -> FillResult:
        result = FillResult()
        started = time.perf_counter()
        image_shards = [shard for kind, shard in shards if kind == "image"]
        text_shards = [shard for kind, shard in shards if kind == "text"]
        if image_shards:
            self._fill_images(image_shards, result, on_rows)
        for shard in text_shards:
            self._fill_text(shard, result, on_rows)
        result.seconds = time.perf_counter() - started
        return result

    def _write(self, kind: str, shard: int, values: np.ndarray, valid: np.ndarray, skipped: dict, result):
        self.store.write_shard(self.cfg.teacher.name, kind, shard, values, valid=valid, skipped=skipped)
        result.rows += len(values)
        result.skipped.update(skipped)
        result.shards.append((kind, shard))

    def _encoded_images(self, order: list[int], on_rows):
        """(image id, unit vector or None, skip reason) for every id in order."""
        batches = image_batches(
            order,
            self.ds.image_path,
            self.teacher.image_transform,
            batch_size=self.cfg.extract.image_batch_size,
            workers=self.cfg.extract.loader_workers,
            known_bad=self.known_bad,
            pin_memory=self.device.type == "cuda",
        )
        for batch in batches:
            encoded = iter(())
            if batch.pixels.numel():
                with torch.inference_mode(), _autocast(self.device, self.precision):
                    encoded = iter(_to_numpy(self.teacher.encode_images(batch.pixels.to(self.device))))
            for image_id, ok, reason in zip(batch.ids.tolist(), batch.ok.tolist(), batch.reasons, strict=True):
                yield image_id, (next(encoded) if ok else None), reason
            if on_rows:
                on_rows(len(batch.ids))

    def _fill_images(self, shards: list[int], result: FillResult, on_rows) -> None:
        name, dim = self.cfg.teacher.name, self.teacher.dim
        ranges = [self.store.shard_rows(name, "image", shard) for shard in shards]
        order = [i for start, stop in ranges for i in range(start, stop) if self.image_selected[i]]
        rows = self._encoded_images(order, on_rows)
        # Rows arrive in shard order, so each shard is written as soon as its last row is encoded.
        for shard, (start, stop) in zip(shards, ranges, strict=True):
            values = np.zeros((stop - start, dim), np.float32)
            valid = np.zeros(stop - start, bool)
            skipped = self._unselected(range(start, stop), self.image_selected)
            for _ in range(sum(1 for i in range(start, stop) if self.image_selected[i])):
                image_id, vector, reason = next(rows)
                if vector is None:
                    skipped[image_id] = reason
                else:
                    values[image_id - start] = vector
                    valid[image_id - start] = True
            self._write("image", shard, values, valid, skipped, result)

    @staticmethod
    def _unselected(rows: range, selected: np.ndarray) -> dict[int, str]:
        return {i: "split not selected for extraction" for i in rows if not selected[i]}

    def _fill_text(self, shard: int, result: FillResult, on_rows) -> None:
        name, dim = self.cfg.teacher.name, self.teacher.dim
        start, stop = self.store.shard_rows(name, "text", shard)
        values = np.zeros((stop - start, dim), np.float32)
        valid = np.zeros(stop - start, bool)
        skipped = self._unselected(range(start, stop), self.caption_selected)
        rows = [i for i in range(start, stop) if self.caption_selected[i]]
        size = self.cfg.extract.text_batch_size
        for offset in range(0, len(rows), size):
            chunk = rows[offset : offset + size]
            tokens = self.teacher.tokenize([self.captions[i] for i in chunk])
            tokens = {k: v.to(self.device, non_blocking=True) for k, v in tokens.items()}
            with torch.inference_mode(), _autocast(self.device, self.precision):
                emb = self.teacher.encode_texts(tokens)
            local = np.asarray(chunk) - start
            values[local] = _to_numpy(emb)
            valid[local] = True
            if on_rows:
                on_rows(len(chunk))
        self._write("text", shard, values, valid, skipped, result)


def fill_on_worker(cfg: Config, shards: list[tuple[str, int]], device: str) -> FillResult:
    """Entry point of a Dask task: load everything on the worker, fill the shards it owns."""
    return ExtractWorker(cfg, device=device).fill(shards)


def prepare_on_worker(cfg: Config, device: str) -> int:
    worker = ExtractWorker(cfg, device=device)
    worker.prepare()
    return worker.teacher.dim
