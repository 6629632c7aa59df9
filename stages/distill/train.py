"""`dsmd distill`: train the student against the teacher features in the store (METHOD.md).

Outputs under distill.out_dir: ``student/`` (the best student by validation RSUM: safetensors + card),
``checkpoints/last.pt`` (everything to resume), ``train_log.csv`` (every loss, balancer weight and magnitude
and the learning rate per optimiser step), ``val_log.csv`` (Recall@K per epoch), ``summary.json`` and the same
numbers in ``metrics/`` (one file per measure, pipeline.dvc_metrics).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline.config import Config
from pipeline.console import console, make_progress
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.pairs import usable_pairs
from pipeline.dvc_metrics import write_by_measure
from pipeline.encode import encode_images, encode_texts
from pipeline.errors import DsmdError
from pipeline.models.student import Student, load_vocab_tokenizer, make_tokenizer, save_student
from pipeline.retrieval.metrics import retrieval_metrics
from stages.distill.balancer import DynamicBalancer
from stages.distill.checkpoint import (
    LAST,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_failed,
)
from stages.distill.data import EpochBatches, PairRows
from stages.distill.ddp import Ranks, barrier, gather_plain, gather_with_grad, init_from_torchrun, shutdown
from stages.distill.guard import NonFiniteError, grad_norm, nonfinite_tensors
from stages.distill.methods import method_for

# Settings that change how a run executes but not what it computes: a checkpoint stays resumable across them.
# ``epochs`` is one of them: the first N epochs of a longer run are the N epochs of a shorter one (the
# learning-rate steps and balancer periods do not depend on the total), so a finished run can be extended.
RUNTIME_SETTINGS = {
    "device", "loader_workers", "checkpoint_every", "checkpoint_minutes", "out_dir", "tensorboard",
    "load_store_in_ram", "epochs", "val_batch_size",
}


def config_digest(cfg: Config, dataset_fingerprint: str, teacher_provenance: dict | None = None) -> str:
    """What a checkpoint must agree on to be resumed: student and training settings, the dataset and how the
    teacher features were made (a store re-extracted with another checkpoint gives other targets)."""
    distill = {k: v for k, v in dataclasses.asdict(cfg.distill).items() if k not in RUNTIME_SETTINGS}
    payload = {
        "student": dataclasses.asdict(cfg.student),
        "distill": distill,
        "dataset": dataset_fingerprint,
        "teacher": teacher_provenance or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _device(name: str, ranks: Ranks) -> torch.device:
    if name == "auto":
        name = _device_type(name)
    if name == "cuda" and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


class _Tokenize:
    """A picklable tokenise function for loader workers (the model itself stays in the main process)."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, texts: list[str]) -> dict:
        out = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class CsvLog:
    """Append-only CSV. On resume the rows the checkpoint does not cover (``keep`` is False for them) are
    dropped, so the resumed run logs none of them twice; a fresh run (keep None) starts an empty file."""

    def __init__(self, path: Path, columns: list[str], keep: Callable[[dict], bool] | None):
        self.path, self.columns = path, columns
        rows = []
        if keep is not None and path.exists():
            with path.open() as handle:
                rows = [row for row in csv.DictReader(handle) if keep(row)]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.columns, extrasaction="ignore").writerow(row)


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg = cfg
        dc = cfg.distill
        # The backend follows the device the run will use (nccl for GPUs, also when device is "auto").
        self.ranks = init_from_torchrun(_device_type(dc.device))
        self.device = _device(dc.device, self.ranks)
        micro = dc.batch_size // dc.grad_accum
        if dc.batch_size % dc.grad_accum or micro % self.ranks.world:
            raise DsmdError(
                f"distill.batch_size ({dc.batch_size}) must split evenly into grad_accum ({dc.grad_accum}) "
                f"micro-batches over {self.ranks.world} rank(s)"
            )
        self.micro_batch = micro  # pairs per forward pass, summed over ranks
        self.out = Path(dc.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ds = CanonicalDataset.load(cfg.data.canonical_dir)
        # Loader workers open their own reader; the main process needs the rows only when it loads batches.
        self.method = method_for(cfg, self.ds, in_memory=dc.load_store_in_ram and dc.loader_workers == 0)
        self.reader = self.method.reader
        self.dim = self.reader.dim(dc.teacher, "image")
        image_valid = self.reader.valid(dc.teacher, "image")
        text_valid = self.reader.valid(dc.teacher, "text")
        self.train_pairs = self.method.train_pairs(image_valid, text_valid)
        if len(self.train_pairs) < dc.batch_size:
            raise DsmdError(
                f"only {len(self.train_pairs)} usable training pairs, fewer than distill.batch_size "
                f"({dc.batch_size}); lower the batch size or check the dataset and store"
            )
        val_images = self.ds.image_ids("val")
        self.val_images = val_images[image_valid[val_images]]
        val_captions = usable_pairs(self.ds, "val", image_valid, text_valid)
        self.val_captions = val_captions
        self.digest = config_digest(cfg, self.ds.fingerprint, self.method.provenance())

        torch.manual_seed(dc.seed)
        self.student = Student(cfg.student, self.dim, tokenizer=self._tokenizer()).to(self.device)
        self.model = (
            DistributedDataParallel(self.student, device_ids=[self.device] if self.device.type == "cuda" else None)
            if self.ranks.distributed
            else self.student
        )
        self.losses = self.method.objective(self.dim).to(self.device)
        self.balancer = DynamicBalancer.from_config(self.losses.names, dc.balancer)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=dc.lr, weight_decay=dc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, dc.lr_step_epochs, dc.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and dc.precision == "fp16")

        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self._saved_step, self._saved_at = 0, time.monotonic()
        self.best_rsum, self.best_epoch = -1.0, -1
        resumed = self._maybe_resume(resume)
        self.value_names = [*self.method.value_names(self.losses, self.device, self.dim), "total"]
        balancer_columns = [f"{p}_{n}" for p in ("w", "a", "r") for n in self.losses.names]
        # Train rows are keyed by step, validation rows by completed epoch (a checkpoint taken at the last step
        # of an epoch precedes that epoch's validation, which the resumed run does again).
        step, epoch = self.step, self.epoch
        self.log = CsvLog(
            self.out / "train_log.csv",
            ["step", "epoch", "lr", *self.value_names, *balancer_columns, "samples_per_s"],
            (lambda row: int(row["step"]) <= step) if resumed else None,
        ) if self.ranks.is_main else None
        ks = dc.val_ks
        self.val_log = CsvLog(
            self.out / "val_log.csv",
            ["step", "epoch", *[f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks], "rsum"],
            (lambda row: int(row["epoch"]) <= epoch) if resumed else None,
        ) if self.ranks.is_main else None
        self.tensorboard = self._tensorboard() if dc.tensorboard and self.ranks.is_main else None

    def _tokenizer(self):
        """The student's tokenizer. A vocabulary built from the captions is written by rank 0 alone; the other
        ranks read it once it is complete."""
        cfg = self.cfg
        vocab_dir = self.out / "vocab"
        tokenizer = None
        if cfg.student.text_model_dir or self.ranks.is_main:
            texts = None if cfg.student.text_model_dir else self.ds.texts(self.ds.caption_ids("train"))
            tokenizer = make_tokenizer(cfg.student, vocab_dir, texts=texts)
        barrier(self.ranks)
        return tokenizer if tokenizer is not None else load_vocab_tokenizer(vocab_dir / "vocab.txt")

    # ------------------------------------------------------------------------------------------ state

    def _state(self) -> dict:
        return {
            "digest": self.digest,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "losses": self.losses.state_dict(),
            "balancer": self.balancer.state_dict(),
            "rng": rng_state(),
            "progress": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step},
            "best": {"rsum": self.best_rsum, "epoch": self.best_epoch},
        }

    def _save(self) -> None:
        if self.ranks.is_main:
            bad = nonfinite_tensors(self.student.state_dict())
            if bad:  # the step checks should have stopped the run before; never overwrite a good checkpoint
                raise NonFiniteError(
                    f"not saving {self.out / 'checkpoints' / LAST}: non-finite weights in {', '.join(bad[:5])} at "
                    f"step {self.step}; lower distill.lr or use precision fp32"
                )
            save_checkpoint(self.out / "checkpoints" / LAST, self._state())
        self._saved_step, self._saved_at = self.step, time.monotonic()
        barrier(self.ranks)

    def _maybe_resume(self, resume: str) -> bool:
        path = self.out / "checkpoints" / LAST
        if resume == "no" or (resume == "auto" and not path.exists()):
            return False
        state = load_checkpoint(path)
        bad = nonfinite_tensors(state.get("model", {}))
        if bad:
            raise NonFiniteError(
                f"{path} holds non-finite weights ({', '.join(bad[:5])}): it cannot be resumed. Delete it (or run "
                "with --resume no) to start over"
            )
        if state.get("digest") != self.digest:
            message = (
                f"{path} was written by a run with other settings or another dataset; "
                "it cannot be resumed with this configuration"
            )
            if resume == "yes":
                raise DsmdError(message + " (run without --resume to start over)")
            console.print(f"[yellow]{message}: starting a fresh run[/yellow]")
            return False
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.losses.load_state_dict(state["losses"])
        self.balancer.load_state_dict(state["balancer"])
        set_rng_state(state["rng"])
        progress = state["progress"]
        self.epoch, self.batch_in_epoch, self.step = progress["epoch"], progress["batch_in_epoch"], progress["step"]
        self.best_rsum, self.best_epoch = state["best"]["rsum"], state["best"]["epoch"]
        self._saved_step = self.step
        console.print(f"resuming {path}: epoch {self.epoch}, batch {self.batch_in_epoch}, step {self.step}")
        return True

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DsmdError(
                "distill.tensorboard is on but the tensorboard package is missing: pip install tensorboard"
            ) from None
        return SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------------------------------------ data

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        dc = self.cfg.distill
        sampler = EpochBatches(
            len(self.train_pairs),
            self.micro_batch,
            seed=dc.seed,
            epoch=epoch,
            rank=self.ranks.rank,
            world=self.ranks.world,
            start_batch=start_batch,
            group=dc.grad_accum,
        )
        tokenize = _Tokenize(self.student.tokenizer, self.cfg.student.max_text_len)
        collate = self.method.collate(tokenize, dc.loader_workers)
        return DataLoader(
            PairRows(self.ds, self.train_pairs, self.student.image_transform(train=True)),
            batch_sampler=sampler,
            num_workers=dc.loader_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if dc.loader_workers > 0 else None,
            # Its own generator: creating the loader must not consume the global RNG a resumed run restores.
            generator=torch.Generator().manual_seed(dc.seed + epoch),
        )

    # ------------------------------------------------------------------------------------------ steps

    def _check_equal_batches(self, batch) -> None:
        """Under DDP every rank must bring a full slice (the gathers need equal sizes). A rank that dropped an
        image that no longer decodes must not leave the others waiting in a gather: all ranks learn of it
        through one small collective and stop together."""
        if not self.ranks.distributed:
            return
        count = torch.tensor([len(batch.image_ids)], device=self.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        if int(count) != self.micro_batch // self.ranks.world:
            raise DsmdError(
                "an image failed to decode during multi-process training (the images changed after extraction); "
                "run `dsmd data check`, then `dsmd extract`"
            )

    def _forward(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple]:
        dev = self.device
        self._check_equal_batches(batch)
        pixels = batch.pixels.to(dev, non_blocking=True)
        tokens = {k: v.to(dev, non_blocking=True) for k, v in batch.tokens.items()}
        with _autocast(dev, self.cfg.distill.precision):
            s_v, s_t = self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        # Losses in float32, over the global batch: in-batch negatives come from every rank.
        s_v = gather_with_grad(s_v.float(), self.ranks)
        s_t = gather_with_grad(s_t.float(), self.ranks)
        ids = gather_plain(batch.image_ids.to(dev), self.ranks)
        values, teacher = self.method.losses(
            self.losses, s_v, s_t, batch, dev, ids, lambda x: gather_plain(x, self.ranks)
        )
        total = self.balancer(self.losses.top_level(values))
        return values, total, teacher

    def _due_by_time(self) -> bool:
        """distill.checkpoint_minutes passed since the last save. Under DDP rank 0's clock decides for all, so
        every rank reaches the save's barrier."""
        minutes = self.cfg.distill.checkpoint_minutes
        if minutes <= 0:
            return False
        due = torch.tensor([time.monotonic() - self._saved_at >= minutes * 60], device=self.device)
        if self.ranks.distributed:
            torch.distributed.broadcast(due, src=0)
        return bool(due)

    def _where(self, batches: list) -> str:
        captions = torch.cat([b.caption_ids for b in batches]).tolist()
        images = sorted(set(torch.cat([b.image_ids for b in batches]).tolist()))

        def listed(ids: list[int]) -> str:
            return ", ".join(map(str, ids[:16])) + (f", ... ({len(ids)} in all)" if len(ids) > 16 else "")

        last = self.out / "checkpoints" / LAST
        kept = f"the last checkpoint ({last}, step {self._saved_step}) is untouched" if last.exists() else (
            "no checkpoint was saved")
        return (f"step {self.step + 1} (epoch {self.epoch + 1}), caption ids [{listed(captions)}], image ids "
                f"[{listed(images)}]; {kept}")

    def _check_teacher_rows(self, batch) -> None:
        if batch.bad_rows:
            raise NonFiniteError(
                f"non-finite or non-unit teacher features in {self.cfg.extract.store}: {'; '.join(batch.bad_rows)} "
                f"at {self._where([batch])}. Run `dsmd store verify`, then `dsmd extract --repair` (or re-extract "
                "those shards) and rerun distill"
            )

    def _check_finite_step(self, sums: torch.Tensor, batches: list) -> None:
        """Before the optimiser applies the step: every loss finite and, unless the fp16 scaler (which skips
        such steps itself) is on, the gradient norm finite. One host sync."""
        checks = [torch.isfinite(sums).all()]
        if not self.scaler.is_enabled():
            checks.append(torch.isfinite(grad_norm(self.optimizer_parameters())).to(sums.device))
        finite = torch.stack(checks).all()
        if bool(finite):
            return
        losses = dict(zip(self.value_names, sums.tolist(), strict=True))
        bad = ", ".join(f"{name} {value}" for name, value in losses.items() if not np.isfinite(value))
        what = f"loss ({bad})" if bad else "gradient"
        raise NonFiniteError(
            f"non-finite {what} at {self._where(batches)}. Lower distill.lr, check the data of that batch, or "
            "use precision fp32; resuming restarts from the last checkpoint"
        )

    def optimizer_parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.balancer.end_step()

    def train(self) -> dict:
        dc = self.cfg.distill
        steps_per_epoch = (
            EpochBatches.batches_per_epoch(len(self.train_pairs), self.micro_batch, dc.grad_accum) // dc.grad_accum
        )
        started = time.perf_counter()
        samples = 0
        if self.epoch >= dc.epochs:
            console.print(f"{self.out} already holds a finished run of {self.epoch} epochs; nothing to do")
            shutdown(self.ranks)
            return self._summary(0, 0.0)
        while self.epoch < dc.epochs:
            self.model.train()
            loader = self._loader(self.epoch, self.batch_in_epoch)
            # Losses summed on the device over the micro-batches of a step: one host sync per step, not per value.
            sums: torch.Tensor | None = None
            micro_in_step = 0
            step_batches: list = []  # the micro-batches of the step, named if it goes non-finite
            with make_progress() as progress:
                task = progress.add_task(
                    f"epoch {self.epoch + 1}/{dc.epochs}",
                    total=steps_per_epoch,
                    completed=self.batch_in_epoch // dc.grad_accum,
                    rate="",
                )
                step_started = time.perf_counter()
                for batch in loader:
                    sync = micro_in_step + 1 == dc.grad_accum
                    no_sync = self.model.no_sync if self.ranks.distributed and not sync else contextlib.nullcontext
                    self._check_teacher_rows(batch)
                    step_batches.append(batch)
                    with no_sync():
                        values, total, teacher = self._forward(batch)
                        self.scaler.scale(total / dc.grad_accum).backward()
                    self.losses.enqueue(*teacher)
                    step_values = torch.stack([*(values[n].detach() for n in self.value_names[:-1]), total.detach()])
                    sums = step_values if sums is None else sums + step_values
                    micro_in_step += 1
                    self.batch_in_epoch += 1
                    if not sync:
                        continue
                    self._check_finite_step(sums, step_batches)
                    step_batches = []
                    self._optimizer_step()
                    elapsed = time.perf_counter() - step_started
                    rate = dc.batch_size / elapsed if elapsed > 0 else 0.0
                    samples += dc.batch_size
                    means = dict(zip(self.value_names, (sums / micro_in_step).tolist(), strict=True))
                    self._log_step(means, rate)
                    sums, micro_in_step = None, 0
                    progress.update(task, advance=1, rate=f"{rate:.0f} pairs/s")
                    if self._due_by_time() or (dc.checkpoint_every > 0 and self.step % dc.checkpoint_every == 0):
                        self._save()
                    step_started = time.perf_counter()
            self.scheduler.step()
            self.balancer.end_epoch()
            self.epoch += 1
            self.batch_in_epoch = 0
            self._end_of_epoch()
            self._save()
        seconds = time.perf_counter() - started
        summary = self._finish(samples, seconds)
        shutdown(self.ranks)
        return summary

    def _save_student(self, metrics: dict | None) -> None:
        """Write the student next to its final place and swap it in, so a kill never leaves half a student."""
        final = self.out / "student"
        staging = self.out / "student.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            save_student(self.student, staging, self._card(metrics))
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise write_failed(staging, exc, f"the previous student in {final} is kept") from None
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)

    def _log_step(self, means: dict[str, float], rate: float) -> None:
        if self.log is None:
            return
        row = {"step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"], **means}
        row.update({f"w_{n}": v for n, v in self.balancer.weights.items()})
        row.update({f"a_{n}": v for n, v in self.balancer.magnitudes.items()})
        row.update({f"r_{n}": v for n, v in self.balancer.rates.items()})
        row["samples_per_s"] = rate
        self.log.write(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, self.step)

    # ------------------------------------------------------------------------------------------ validation

    def validate(self) -> dict[str, float] | None:
        if len(self.val_images) == 0 or len(self.val_captions) == 0:
            return None
        student, dc = self.student, self.cfg.distill
        student.eval()
        image_emb, decoded = encode_images(
            student.encode_image,
            self.ds,
            self.val_images,
            student.image_transform(),
            dim=self.dim,
            batch_size=dc.val_batch_size,
            device=self.device,
            workers=dc.loader_workers,
        )
        text_emb = encode_texts(
            student.encode_text,
            _Tokenize(student.tokenizer, self.cfg.student.max_text_len),
            self.ds.texts(self.val_captions),
            batch_size=dc.val_batch_size,
            device=self.device,
        )
        student.train()
        row_of = {int(image_id): row for row, image_id in enumerate(self.val_images)}
        caption_image = np.array([row_of[int(i)] for i in self.ds.caption_image_ids()[self.val_captions]])
        keep = decoded[caption_image]
        image_emb[~decoded] = 0.0
        return retrieval_metrics(image_emb, text_emb[keep], caption_image[keep], dc.val_ks)

    def _card(self, metrics: dict | None) -> dict:
        return {
            "teacher": self.cfg.distill.teacher,
            "teacher_provenance": self.reader.provenance(self.cfg.distill.teacher, "image").get("teacher", {}),
            "dataset": {"name": self.ds.name, "fingerprint": self.ds.fingerprint},
            "store": str(self.cfg.extract.store),
            "method": self.cfg.distill.method,
            "epoch": self.epoch,
            "step": self.step,
            "val_metrics": metrics or {},
        }

    def _end_of_epoch(self) -> None:
        if self.ranks.is_main:
            metrics = self.validate()
            if metrics is not None:
                self.val_log.write({"step": self.step, "epoch": self.epoch, **metrics})
                console.print(
                    f"epoch {self.epoch}: val RSUM {metrics['rsum']:.1f} "
                    f"(i2t R@1 {metrics['i2t_r1']:.1f}, t2i R@1 {metrics['t2i_r1']:.1f})"
                )
                if metrics["rsum"] > self.best_rsum:
                    self.best_rsum, self.best_epoch = metrics["rsum"], self.epoch
                    self._save_student(metrics)
            elif self.epoch == self.cfg.distill.epochs:
                self._save_student(None)
        barrier(self.ranks)

    def _summary(self, samples: int, seconds: float) -> dict:
        return {
            "epochs": self.cfg.distill.epochs,
            "steps": self.step,
            "best_epoch": self.best_epoch,
            "best_val_rsum": self.best_rsum,
            "train_pairs": int(len(self.train_pairs)),
            "seconds_this_run": round(seconds, 2),
            "pairs_per_s": round(samples / seconds, 2) if seconds > 0 else 0.0,
            "student_parameters": sum(p.numel() for p in self.student.parameters()),
        }

    def _finish(self, samples: int, seconds: float) -> dict:
        summary = self._summary(samples, seconds)
        if self.ranks.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            # For `dvc metrics show`: a row per number, in the student's column next to evaluate's models.
            write_by_measure(self.out / "metrics", {"student": summary})
            console.print(
                f"[green]distill done[/green]: {self.step} steps, best val RSUM {self.best_rsum:.1f} "
                f"at epoch {self.best_epoch}; student in {self.out / 'student'}"
            )
        return summary


def run_distill(cfg: Config, resume: str = "auto") -> dict:
    return Trainer(cfg, resume).train()
