"""What the training loop needs for MCAD: the store reader, usable pairs, batches with every teacher's rows and
the fused rows, and the alignment maps.

A training pair (caption k, its image) takes part only when the fused teacher's pair row of k and every dual
teacher's image and text rows are valid. The fused rows exist for distill.mcad.pair_splits (train by default),
which is all MCAD needs: validation uses the student alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.alignment import alignment_name, load_alignment
from pipeline.config import McadConfig
from pipeline.errors import DsmdError
from stages.distill.data import decoded_items, item_views, pinned
from stages.distill.guard import bad_teacher_rows, describe_rows
from stages.distill.mcad import McadRows
from stages.distill.views import teacher_image_rows
from store import open_store
from store.extras import get_extra

__all__ = [
    "McadBatch",
    "McadCollate",
    "McadReaderOpener",
    "open_mcad_reader",
    "mcad_usable_pairs",
    "mcad_provenance",
    "load_alignments",
]


@dataclass
class McadBatch:
    image_ids: torch.Tensor
    caption_ids: torch.Tensor
    pixels: torch.Tensor
    tokens: dict[str, torch.Tensor]
    teacher_image: dict[str, torch.Tensor]  # dual teacher name -> (B, D_m) rows of the pairs' images
    teacher_text: dict[str, torch.Tensor]  # dual teacher name -> (B, D_m) rows of the pairs' captions
    fused: torch.Tensor  # (B, d_fused) the fused teacher's pair rows
    bad_rows: tuple[str, ...] = ()  # teacher rows that are not finite or not unit norm (stages.distill.guard)
    views: torch.Tensor | None = None  # the stored view of each image (distill.views), as in PairBatch

    def teacher_rows(
        self, device: torch.device | str, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> McadRows:
        """The teacher side as McadObjective takes it: McadRows on `device`, float32, each tensor passed through
        `gather` (e.g. the DDP all-gather, so that the losses see the global batch)."""
        def move(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True).float()
            return gather(x) if gather is not None else x

        features = {n: (move(self.teacher_image[n]), move(self.teacher_text[n])) for n in self.teacher_image}
        return McadRows(features, move(self.fused))

    def pin_memory(self) -> McadBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types (as on PairBatch).
        return pinned(self)


def open_mcad_reader(path: str | Path, dataset_fingerprint: str, cfg: McadConfig, in_memory: bool = False,
                     cache: dict | None = None):
    """A store reader checked to hold every dual teacher's image and text arrays and the fused pair array.
    ``cache``: open_store's shard cache settings for an s3:// store (`methods.reader_cache`)."""
    reader = open_store(path, dataset_fingerprint=dataset_fingerprint, teacher=list(cfg.teachers), in_memory=in_memory,
                        **(cache or {}))
    if (cfg.fused_teacher, "pair") not in reader.arrays():
        reader.close()
        raise DsmdError(
            f"{path}: no {cfg.fused_teacher}/pair features (the fused image+caption rows MCAD needs); run "
            f"dsmd extract-pairs with teacher.name={cfg.fused_teacher}"
        )
    if in_memory:
        reader.load_all([cfg.fused_teacher], ["pair"])
    return reader


class McadReaderOpener:
    """Picklable: each loader worker opens its own reader."""

    def __init__(self, path: str, dataset_fingerprint: str, cfg: McadConfig, in_memory: bool = False,
                 views: bool = False, cache: dict | None = None):
        self.args = (str(path), dataset_fingerprint, cfg, in_memory, cache)
        self.views = views  # replayed views: their rows go to RAM too

    def __call__(self):
        reader = open_mcad_reader(*self.args)
        in_memory, teachers = self.args[3], list(self.args[2].teachers)
        return reader.load_all(teachers, ["image_view"]) if in_memory and self.views else reader


def mcad_usable_pairs(ds, split: str, reader, teachers: Sequence[str], fused_teacher: str) -> np.ndarray:
    """Caption ids of `split` with a valid fused pair row and valid image and text rows of every teacher."""
    caption_ids = ds.caption_ids(split)
    image_of = ds.caption_image_ids()[caption_ids]
    keep = reader.valid(fused_teacher, "pair")[caption_ids]
    for name in teachers:
        keep &= reader.valid(name, "text")[caption_ids] & reader.valid(name, "image")[image_of]
    return caption_ids[keep]


def mcad_provenance(reader, cfg: McadConfig, store_path: str | Path, dataset_fingerprint: str) -> dict:
    """What an MCAD run's targets depend on, for the checkpoint digest: every dual teacher's provenance, the
    fused pair array's, and the alignment maps' checksums."""
    return {
        "teachers": {name: reader.provenance(name, "image").get("teacher", {}) for name in cfg.teachers},
        "fused": reader.provenance(cfg.fused_teacher, "pair").get("teacher", {}),
        "alignments": {
            name: get_extra(store_path, alignment_name(cfg.fused_teacher, name),
                            dataset_fingerprint=dataset_fingerprint).record["sha256"]
            for name in cfg.teachers
        },
    }


def load_alignments(store_path: str | Path, cfg: McadConfig, dataset_fingerprint: str, reader) -> dict[str, np.ndarray]:
    """Teacher name -> its stored map (d_fused x d_teacher), checked against the store's current features."""
    d_fused = reader.dim(cfg.fused_teacher, "pair")
    maps = {}
    for name in cfg.teachers:
        weight = load_alignment(
            store_path, cfg.fused_teacher, name, dataset_fingerprint=dataset_fingerprint, reader=reader,
            split="train", ridge=cfg.align_ridge,
        )
        want = (d_fused, reader.dim(name, "image"))
        if weight.shape != want:
            raise DsmdError(f"alignment map {cfg.fused_teacher} -> {name} has shape {weight.shape}, expected {want}; "
                            "rerun dsmd extract-pairs")
        maps[name] = weight
    return maps


class McadCollate:
    """Tokenise the captions and fetch every teacher's rows and the fused rows; runs in the loader workers.

    Items are PairRows items (caption id, image id, pixels or None, text); pairs whose image failed to
    decode are dropped, as PairCollate does.
    """

    def __init__(
        self,
        tokenize: Callable[[list[str]], dict],
        open_reader: Callable,
        teachers: Sequence[str],
        fused_teacher: str,
        views: str = "plain",
    ):
        self.tokenize = tokenize
        self.open_reader = open_reader
        self.teachers = list(teachers)
        self.fused_teacher = fused_teacher
        # distill.views: "replay" takes every dual teacher's rows of the items' stored views (the fused pair rows
        # stay those of the plain image: views are not extracted for pairs).
        self.views = views
        self._reader = None

    def __call__(self, items) -> McadBatch:
        if self._reader is None:  # opened once per worker process, never pickled
            self._reader = self.open_reader()
        reader = self._reader
        items, caption_ids, image_ids = decoded_items(items, "`dsmd extract` and `dsmd extract-pairs`")
        views = item_views(items)
        picked = {n: teacher_image_rows(reader, n, image_ids, views, self.views) for n in self.teachers}
        image = {n: rows for n, (rows, _) in picked.items()}
        text = {n: reader.get(n, "text", caption_ids) for n in self.teachers}
        fused = reader.get(self.fused_teacher, "pair", caption_ids)
        bad = {array: bad_teacher_rows(image[n], image_ids) for n, (_, array) in picked.items()}
        bad.update({f"{n}/text": bad_teacher_rows(text[n], caption_ids) for n in self.teachers})
        bad[f"{self.fused_teacher}/pair"] = bad_teacher_rows(fused, caption_ids)
        return McadBatch(
            image_ids=torch.from_numpy(image_ids),
            caption_ids=torch.from_numpy(caption_ids),
            pixels=torch.stack([item[2] for item in items]),
            tokens=self.tokenize([item[3] for item in items]),
            teacher_image={n: torch.from_numpy(v) for n, v in image.items()},
            teacher_text={n: torch.from_numpy(v) for n, v in text.items()},
            fused=torch.from_numpy(fused),
            bad_rows=describe_rows(bad),
            views=None if views is None else torch.from_numpy(views),
        )
