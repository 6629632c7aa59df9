"""The teacher side of a distillation method: which store rows a batch carries and which losses consume them.

The training loop is the same for every method; it asks its method for the student's dimension, the valid
rows and usable training pairs, the provenance that keys checkpoints, what the student's card says of the
teacher, the objective (losses with ``names``, ``top_level`` and ``enqueue``), the collate function for loader
workers, per batch the losses on the gathered teacher rows, and what to do after each optimiser step.
The no-teacher baseline (``supervised``) answers all of it without the store.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.pairs import usable_pairs
from pipeline.errors import DsmdError
from stages.distill.data import PairCollate
from stages.distill.losses import DistillationLosses
from stages.distill.mcad import McadObjective
from stages.distill.mcad_data import (
    McadCollate,
    McadReaderOpener,
    load_alignments,
    mcad_provenance,
    mcad_usable_pairs,
    open_mcad_reader,
)
from stages.distill.supervised import SupervisedContrastive
from stages.distill.supervised_data import GroundTruthCollate, pair_validity
from stages.distill.views import VIEW_KIND, ViewPlan, check_views, load_boxes, view_valid
from store import open_store

Gather = Callable[[torch.Tensor], torch.Tensor]


class _OpenReader:
    """Opens the store inside a loader worker (a reader is opened per process, never shared)."""

    def __init__(self, path: str, fingerprint: str, teacher: str, in_memory: bool, cache: dict | None = None,
                 views: bool = False):
        self.args = (path, fingerprint, teacher, in_memory)
        self.cache = cache or {}
        self.views = views  # replayed views: their rows go to RAM too

    def __call__(self):
        path, fingerprint, teacher, in_memory = self.args
        reader = open_store(path, dataset_fingerprint=fingerprint, teacher=teacher, in_memory=in_memory, **self.cache)
        return reader.load_all([teacher], ["image_view"]) if in_memory and self.views else reader


def reader_cache(cfg: Config) -> dict:
    """open_store's local shard cache for an s3:// store (extract.cache_dir, extract.cache_gb)."""
    return {"cache_dir": cfg.extract.cache_dir or None, "cache_bytes": int(cfg.extract.cache_gb * 2**30)}


class _SameReader:
    """Without loader workers the collate function runs in the main process: reuse the trainer's reader."""

    def __init__(self, reader):
        self.reader = reader

    def __call__(self):
        return self.reader


class DsmdMethod:
    """One teacher's image and text rows; the four DSMD losses."""

    def __init__(self, cfg: Config, ds: CanonicalDataset, in_memory: bool):
        self.cfg, self.ds = cfg, ds
        self.teacher = cfg.distill.teacher
        self.reader = self._open_reader(in_memory)
        self.views = cfg.distill.views
        self._boxes = None
        if self.views != "plain":
            check_views(self.reader, str(cfg.extract.store), self._view_teachers(), self.views)
        if in_memory and self.views == "replay":  # distill.load_store_in_ram: the rows replay reads, too
            self.reader.load_all(self._view_teachers(), ["image_view"])

    def _view_teachers(self) -> list[str]:
        return [self.teacher]

    def view_plan(self, epoch: int) -> ViewPlan | None:
        """The stored view each training image is cropped to in ``epoch`` (None: the plain images)."""
        if self.views == "plain":
            return None
        if self._boxes is None:
            self._boxes = load_boxes(self.reader, self.teacher)
        dc = self.cfg.distill
        return ViewPlan(self._boxes, dc.view_order, dc.seed, epoch)

    def _open_reader(self, in_memory: bool):
        return open_store(
            self.cfg.extract.store, dataset_fingerprint=self.ds.fingerprint, teacher=self.teacher, in_memory=in_memory,
            **reader_cache(self.cfg),
        )

    def dim(self) -> int:
        """The student's output dimension: the teacher's."""
        return self.reader.dim(self.teacher, "image")

    def valid(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, caption) masks of the rows with teacher features; they pick the validation pairs."""
        return self.reader.valid(self.teacher, "image"), self.reader.valid(self.teacher, "text")

    def train_pairs(self, image_valid: np.ndarray, text_valid: np.ndarray) -> np.ndarray:
        if self.views != "plain":  # an image trains only with its stored views (a bad image has none)
            image_valid = image_valid & view_valid(self.reader, self._view_teachers())
        return usable_pairs(self.ds, "train", image_valid, text_valid)

    def provenance(self) -> dict:
        provenance = self.reader.provenance(self.teacher, "image").get("teacher", {})
        if self.views != "plain":  # another set of views is other targets: a checkpoint must not resume across
            provenance = {**provenance, "views": self.reader.provenance(self.teacher, "image_view").get("views")}
        return provenance

    def card(self) -> dict:
        """What the student's card says of its teacher."""
        provenance = self.reader.provenance(self.teacher, "image").get("teacher", {})
        return {"teacher": self.teacher, "teacher_provenance": provenance, "store": str(self.cfg.extract.store)}

    def objective(self, dim: int) -> torch.nn.Module:
        return DistillationLosses(self.cfg.distill.losses, dim)

    def value_names(self, objective, device: torch.device, dim: int) -> list[str]:
        probe = torch.nn.functional.normalize(torch.ones(2, dim), dim=-1).to(device)
        with torch.no_grad():
            return list(objective(probe, probe, probe, probe, torch.arange(2, device=device)))

    def _worker_reader(self):
        dc = self.cfg.distill
        return _OpenReader(self.cfg.extract.store, self.ds.fingerprint, self.teacher, dc.load_store_in_ram,
                           reader_cache(self.cfg), views=self.views == "replay")

    def collate(self, tokenize: Callable, workers: int):
        open_reader = self._worker_reader() if workers > 0 else _SameReader(self.reader)
        return PairCollate(tokenize, open_reader, self.teacher, self.views)

    def _image_kind(self) -> str:
        return VIEW_KIND if self.views == "replay" else "image"

    def prefetch_rows(self, caption_ids: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        """The store rows the collate function reads for these training pairs (what WindowPrefetch fetches)."""
        image_ids = self.ds.caption_image_ids()[caption_ids]
        return [(self.teacher, self._image_kind(), image_ids), (self.teacher, "text", caption_ids)]

    def losses(self, objective, s_v, s_t, batch, device: torch.device, ids: torch.Tensor, gather: Gather):
        """(named loss values, what ``objective.enqueue`` takes after the step)."""
        t_v = gather(batch.teacher_image.to(device).float())
        t_t = gather(batch.teacher_text.to(device).float())
        return objective(s_v, s_t, t_v, t_t, ids), (t_v, t_t, ids)

    def after_step(self, objective) -> None:
        pass


class McadMethod(DsmdMethod):
    """Several dual teachers plus the fused pair rows, mapped into the first teacher's space (METHOD.md, MCAD)."""

    def __init__(self, cfg: Config, ds: CanonicalDataset, in_memory: bool):
        mcad = cfg.distill.mcad
        # The first dual teacher defines the student's space (and the one evaluate compares against).
        if cfg.distill.teacher != mcad.teachers[0]:
            raise DsmdError(
                f"distill.method=mcad: distill.teacher ({cfg.distill.teacher!r}) must be the first of "
                f"distill.mcad.teachers ({mcad.teachers[0]!r}), whose space the student learns"
            )
        self.mcad = mcad
        super().__init__(cfg, ds, in_memory)

    def _open_reader(self, in_memory: bool):
        return open_mcad_reader(self.cfg.extract.store, self.ds.fingerprint, self.mcad, in_memory=in_memory,
                                cache=reader_cache(self.cfg))

    def _view_teachers(self) -> list[str]:
        return list(self.mcad.teachers)

    def train_pairs(self, image_valid: np.ndarray, text_valid: np.ndarray) -> np.ndarray:
        pairs = mcad_usable_pairs(self.ds, "train", self.reader, self.mcad.teachers, self.mcad.fused_teacher)
        if self.views != "plain":
            pairs = pairs[view_valid(self.reader, self._view_teachers())[self.ds.caption_image_ids()[pairs]]]
        return pairs

    def provenance(self) -> dict:
        provenance = mcad_provenance(self.reader, self.mcad, self.cfg.extract.store, self.ds.fingerprint)
        if self.views != "plain":
            provenance["views"] = self.reader.provenance(self.teacher, "image_view").get("views")
        return provenance

    def objective(self, dim: int) -> torch.nn.Module:
        maps = load_alignments(self.cfg.extract.store, self.mcad, self.ds.fingerprint, self.reader)
        return McadObjective(self.mcad, self.cfg.distill.losses, maps, dim)

    def value_names(self, objective, device: torch.device, dim: int) -> list[str]:
        return objective.value_names(device)

    def _worker_reader(self):
        store, fingerprint = self.cfg.extract.store, self.ds.fingerprint
        return McadReaderOpener(store, fingerprint, self.mcad, self.cfg.distill.load_store_in_ram,
                                views=self.views == "replay", cache=reader_cache(self.cfg))

    def collate(self, tokenize: Callable, workers: int):
        open_reader = self._worker_reader() if workers > 0 else _SameReader(self.reader)
        return McadCollate(tokenize, open_reader, self.mcad.teachers, self.mcad.fused_teacher, self.views)

    def prefetch_rows(self, caption_ids: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        image_ids = self.ds.caption_image_ids()[caption_ids]
        rows = [(name, kind, ids) for name in self.mcad.teachers
                for kind, ids in ((self._image_kind(), image_ids), ("text", caption_ids))]
        return [*rows, (self.mcad.fused_teacher, "pair", caption_ids)]

    def losses(self, objective, s_v, s_t, batch, device: torch.device, ids: torch.Tensor, gather: Gather):
        rows = batch.teacher_rows(device, gather)
        return objective(s_v, s_t, rows, ids), (rows, ids)


class SupervisedMethod:
    """No teacher: the ground-truth pairs with CLIP's symmetric InfoNCE and its learnable temperature
    (stages.distill.supervised). Never opens the store; the student's width is distill.supervised.dim."""

    reader = None

    def __init__(self, cfg: Config, ds: CanonicalDataset, in_memory: bool):
        if cfg.distill.views != "plain":
            raise DsmdError(
                f"distill.views={cfg.distill.views} replays stored teacher views, but distill.method=supervised "
                "reads no store: set distill.views=plain"
            )
        self.cfg, self.ds = cfg, ds

    def dim(self) -> int:
        return self.cfg.distill.supervised.dim

    def view_plan(self, epoch: int) -> None:
        return None

    def valid(self) -> tuple[np.ndarray, np.ndarray]:
        return pair_validity(self.ds)

    def train_pairs(self, image_valid: np.ndarray, text_valid: np.ndarray) -> np.ndarray:
        return usable_pairs(self.ds, "train", image_valid, text_valid)

    def provenance(self) -> dict:
        return {}  # nothing outside the settings and the dataset, which the checkpoint digest holds already

    def card(self) -> dict:
        return {"teacher": None, "teacher_provenance": {}, "store": None}

    def objective(self, dim: int) -> torch.nn.Module:
        return SupervisedContrastive()

    def value_names(self, objective, device: torch.device, dim: int) -> list[str]:
        probe = torch.nn.functional.normalize(torch.ones(2, dim), dim=-1).to(device)
        with torch.no_grad():
            return list(objective(probe, probe, torch.arange(2, device=device)))

    def collate(self, tokenize: Callable, workers: int):
        return GroundTruthCollate(tokenize)

    def losses(self, objective, s_v, s_t, batch, device: torch.device, ids: torch.Tensor, gather: Gather):
        # Over the gathered global batch, as the other methods: negatives from every rank. Nothing to enqueue.
        return objective(s_v, s_t, ids), ()

    def after_step(self, objective) -> None:
        objective.clamp_()


Method = DsmdMethod | SupervisedMethod


def method_for(cfg: Config, ds: CanonicalDataset, in_memory: bool) -> Method:
    methods = {"dsmd": DsmdMethod, "mcad": McadMethod, "supervised": SupervisedMethod}
    return methods[cfg.distill.method](cfg, ds, in_memory)
