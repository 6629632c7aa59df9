"""`dsmd extract-pairs`: MCAD's fused pair features and the alignment maps, written into the feature store.

1. The configured teacher (`teacher`, which must encode an image and a caption jointly, e.g. BEiT-3 in joint
   mode) encodes every caption of distill.mcad.pair_splits together with its image. The result goes to
   `<teacher.name>/pair` (caption rows, L2-normalised), in whole shards with completion marks like the other
   kinds, so a killed run resumes at the first unfinished shard. Captions whose image is bad (listed by
   `dsmd data check` or failing to decode now) are skipped with the reason; captions of unselected splits are
   skipped as "split not selected for extraction", and a later run with more pair_splits rewrites the shards
   that hold them (the splits are not part of the provenance, as with dsmd extract).
2. For every dual-stream teacher in distill.mcad.teachers that the store holds, the fixed linear map from the
   fused space into that teacher's space is fitted on the training pairs (stages/extract/align.py) and kept as
   a store extra; an up-to-date map is not fitted again.
Runs in-process (no Dask fan-out: the pair pass is one more pass over the training split only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.console import console, make_progress
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.check import load_bad_images
from pipeline.data.rows import SPLITS
from pipeline.errors import DsmdError
from pipeline.models.teachers import Teacher, load_teacher, resolve_device, resolve_precision
from stages.extract.align import ensure_alignment
from stages.extract.batches import image_batches
from stages.extract.plan import UNSELECTED, open_store
from stages.extract.tracked import check_tracked, record_store
from stages.extract.worker import dsmd_version
from store import FeatureStore
from store.backends import writer_lease
from store.writer import Lease

__all__ = ["PairSummary", "extract_pairs", "pair_provenance", "PairFiller"]

KIND = "pair"


@dataclass
class PairSummary:
    teacher: str
    store: str
    rows_written: int = 0
    shards_written: int = 0
    shards_already_done: int = 0
    skipped: dict[int, str] = field(default_factory=dict)  # caption id -> reason (unselected splits left out)
    alignments: dict[str, dict] = field(default_factory=dict)  # dual teacher -> provenance of its map
    seconds: float = 0.0


def pair_provenance(cfg: Config, teacher: Teacher, ds: CanonicalDataset) -> dict:
    return {
        "teacher": teacher.provenance(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint},
        "extraction": {
            "kind": KIND,
            "row": "one per caption: the teacher's fused feature of the (image, caption) pair, encoded jointly",
            "precision": teacher.precision,
            "normalisation": "L2 of the fused feature, recomputed in float32",
        },
        "dsmd_version": dsmd_version(),
    }


def _check_config(cfg: Config) -> None:
    mcad = cfg.distill.mcad
    if mcad.fused_teacher != cfg.teacher.name:
        raise DsmdError(
            f"extract-pairs writes {cfg.teacher.name}/pair (teacher.name), but distill.mcad.fused_teacher is "
            f"{mcad.fused_teacher!r}: set distill.mcad.fused_teacher={cfg.teacher.name} (or teacher.name to match)"
        )
    unknown = [split for split in mcad.pair_splits if split not in SPLITS]
    if unknown or not mcad.pair_splits:
        raise DsmdError(
            f"distill.mcad.pair_splits {list(mcad.pair_splits)!r}: give one or more of {', '.join(SPLITS)} "
            "(MCAD trains on 'train')"
        )
    if not (Path(cfg.data.canonical_dir) / "dataset.json").exists():
        raise DsmdError(f"no canonical dataset in {cfg.data.canonical_dir}: run `dsmd data prepare` first")
    check_tracked(cfg)


class PairFiller:
    """Encodes the pairs of whole caption shards and writes them; holds the teacher, dataset and store."""

    def __init__(self, cfg: Config, ds: CanonicalDataset, store: FeatureStore, teacher: Teacher):
        if not getattr(teacher, "supports_pairs", False):
            raise DsmdError(
                f"teacher {teacher.name!r} ({cfg.teacher.kind}) cannot encode an image and a caption jointly; "
                "MCAD's fused features need a single-stream teacher such as BEiT-3 (teacher.kind: beit3)"
            )
        self.cfg, self.ds, self.store, self.teacher = cfg, ds, store, teacher
        self.name = cfg.teacher.name
        self.dim = int(getattr(teacher, "pair_dim", teacher.dim))
        self.known_bad = load_bad_images(cfg.data.canonical_dir)
        splits = np.asarray(ds.captions.column("split").to_pylist(), dtype=object)
        self.selected = np.isin(splits, list(cfg.distill.mcad.pair_splits))
        self.image_of = ds.caption_image_ids()
        self.texts = ds.captions.column("text").to_pylist()

    def prepare(self) -> None:
        provenance = pair_provenance(self.cfg, self.teacher, self.ds)
        self.store.ensure_array(self.name, KIND, self.dim, dtype=self.cfg.extract.dtype, provenance=provenance)

    def plan(self) -> list[int]:
        """Shards to write: unfinished ones, and finished ones holding rows skipped as unselected whose split is
        selected now (distill.mcad.pair_splits widened: the shard is rewritten whole, as dsmd extract does)."""
        pending = set(self.store.pending_shards(self.name, KIND))
        rows_per_shard = self.store.layout.rows_per_shard
        widened = {
            row // rows_per_shard
            for row, reason in self.store.skipped(self.name, KIND).items()
            if reason == UNSELECTED and self.selected[row]
        }
        return sorted(pending | widened)

    def fill(self, shards: list[int], on_rows: Callable[[int], None] | None = None, summary: PairSummary | None = None):
        summary = summary or PairSummary(self.name, str(self.store.path))
        pending = set(self.store.pending_shards(self.name, KIND))
        for shard in shards:
            start, stop = self.store.shard_rows(self.name, KIND, shard)
            values, valid, skipped = self.encode_rows(start, stop, on_rows)
            self.store.write_shard(
                self.name, KIND, shard, values, valid=valid, skipped=skipped, overwrite=shard not in pending
            )
            summary.rows_written += stop - start
            summary.shards_written += 1
            summary.skipped.update({k: v for k, v in skipped.items() if v != UNSELECTED})
        return summary

    def encode_rows(self, start: int, stop: int, on_rows=None) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Fused rows of captions start..stop-1: (values, valid mask, skipped {caption id: reason})."""
        values = np.zeros((stop - start, self.dim), np.float32)
        valid = np.zeros(stop - start, bool)
        skipped = {i: UNSELECTED for i in range(start, stop) if not self.selected[i]}
        captions_of: dict[int, list[int]] = {}
        for caption_id in range(start, stop):
            if self.selected[caption_id]:
                captions_of.setdefault(int(self.image_of[caption_id]), []).append(caption_id)
        # Each image is decoded once per shard and paired with each of its captions in the shard.
        images = list(captions_of)
        size = self.cfg.extract.image_batch_size
        batches = image_batches(
            [images[i : i + size] for i in range(0, len(images), size)],
            self.ds.image_source,
            self.teacher.image_transform,
            workers=self.cfg.extract.loader_workers,
            known_bad=self.known_bad,
            pin_memory=self.teacher.device.type == "cuda",
        )
        for batch in batches:
            pixel_row = {}
            done = 0
            for image_id, ok, reason in zip(batch.ids.tolist(), batch.ok.tolist(), batch.reasons, strict=True):
                if ok:
                    pixel_row[image_id] = len(pixel_row)
                else:
                    for caption_id in captions_of[image_id]:
                        skipped[caption_id] = f"image {image_id} unusable: {reason}"
                    done += len(captions_of[image_id])
            pairs = [(c, pixel_row[i]) for i in pixel_row for c in captions_of[i]]
            for offset in range(0, len(pairs), self.cfg.extract.image_batch_size):
                chunk = pairs[offset : offset + self.cfg.extract.image_batch_size]
                caption_ids = np.array([c for c, _ in chunk])
                pixels = batch.pixels[torch.tensor([row for _, row in chunk])]
                fused = self._encode(pixels, [self.texts[c] for c in caption_ids])
                values[caption_ids - start] = fused
                valid[caption_ids - start] = True
                if on_rows:
                    on_rows(len(chunk))
            if on_rows and done:
                on_rows(done)
        return values, valid, skipped

    def _encode(self, pixels: torch.Tensor, texts: list[str]) -> np.ndarray:
        tokens = self.teacher.tokenize(texts)
        with torch.inference_mode():
            fused = self.teacher.encode_pairs(pixels.to(self.teacher.device), tokens)
        # bf16 outputs are a little off the unit sphere; the store promises unit norm, so renormalise in fp32.
        out = F.normalize(fused.float(), dim=-1).cpu().numpy()
        if out.shape != (len(texts), self.dim):
            raise DsmdError(f"teacher {self.name!r}: encode_pairs gave shape {out.shape}, expected "
                            f"({len(texts)}, {self.dim})")
        return out


def _selected_rows(filler: PairFiller, shards: list[int]) -> int:
    total = 0
    for shard in shards:
        start, stop = filler.store.shard_rows(filler.name, KIND, shard)
        total += int(filler.selected[start:stop].sum())
    return total


def extract_pairs(cfg: Config, *, teacher: Teacher | None = None, align: bool = True) -> PairSummary:
    """Fill `<teacher.name>/pair` (resuming), then fit the missing or stale alignment maps (align=True)."""
    _check_config(cfg)
    with writer_lease(cfg.extract.store, "dsmd extract-pairs") as lease:
        summary = _extract_pairs(cfg, teacher, align, lease)
    record_store(cfg)
    return summary


def _extract_pairs(cfg: Config, teacher: Teacher | None, align: bool, lease: Lease | None) -> PairSummary:
    started = time.perf_counter()
    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    name = cfg.teacher.name
    with open_store(cfg, ds, lease) as store:
        summary = PairSummary(name, str(cfg.extract.store))
        # The teacher is loaded even when every shard is done: ensure_array then checks that the stored rows
        # came from this very teacher (provenance), so a changed checkpoint is refused, not silently mixed.
        if teacher is None:
            device = resolve_device(cfg.extract.device)
            teacher = load_teacher(cfg.teacher, device, resolve_precision(cfg.extract.precision, device))
        filler = PairFiller(cfg, ds, store, teacher)
        filler.prepare()
        pending = filler.plan()
        summary.shards_already_done = store.num_shards(KIND) - len(pending)
        if pending:
            with make_progress() as progress:
                task = progress.add_task(f"extract {name}/pair", total=_selected_rows(filler, pending), rate="")

                def advance(n: int) -> None:
                    speed = progress.tasks[task].speed
                    progress.update(task, advance=n, rate=f"{speed:.1f} pairs/s" if speed else "")

                filler.fill(pending, on_rows=advance, summary=summary)
    if align:
        summary.alignments = fit_alignments(cfg, ds)
    summary.seconds = time.perf_counter() - started
    _print_summary(summary)
    return summary


def fit_alignments(cfg: Config, ds: CanonicalDataset) -> dict[str, dict]:
    """Fit (or keep) the map into every dual teacher the store holds; warn about the ones it lacks."""
    from store import open_store as open_reader

    mcad = cfg.distill.mcad
    out = {}
    with open_reader(cfg.extract.store, dataset_fingerprint=ds.fingerprint, kinds=()) as reader:
        for dual in mcad.teachers:
            arrays = reader.arrays()
            if (dual, "image") not in arrays or (dual, "text") not in arrays:
                console.print(
                    f"[yellow]no {dual}/image and {dual}/text features in {cfg.extract.store} yet: extract them "
                    f"(dsmd extract with teacher.name={dual}), then rerun dsmd extract-pairs to fit its map[/yellow]",
                    highlight=False,
                )
                continue
            fit, provenance = ensure_alignment(
                cfg.extract.store, reader, ds, mcad.fused_teacher, dual, split="train", ridge=mcad.align_ridge
            )
            out[dual] = {**provenance, "refitted": fit is not None}
    return out


def _print_summary(summary: PairSummary) -> None:
    console.print(
        f"[green]extract-pairs done[/green]: {summary.teacher}/pair -> {summary.store}; "
        f"{summary.shards_written} shards written ({summary.shards_already_done} were already complete), "
        f"{summary.rows_written} rows in {summary.seconds:.1f}s; {len(summary.skipped)} caption(s) skipped",
        highlight=False,
    )
    for caption_id, reason in sorted(summary.skipped.items())[:20]:
        console.print(f"  skipped caption {caption_id}: {reason}", highlight=False)
    if len(summary.skipped) > 20:
        console.print(f"  ... and {len(summary.skipped) - 20} more (see `dsmd store info`)", highlight=False)
    for dual, record in summary.alignments.items():
        state = "fitted" if record.get("refitted") else "up to date"
        console.print(
            f"  alignment {summary.teacher}/pair -> {dual}: {state}, {record.get('rows')} training pairs, "
            f"R^2 {record.get('r2', float('nan')):.3f}",
            highlight=False,
        )
