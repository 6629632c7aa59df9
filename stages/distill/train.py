"""`dsmd distill`: train the student against the teacher features in the store (METHOD.md), or, with
distill.method=supervised, on the ground-truth pairs alone (the no-teacher baseline).

Outputs under distill.out_dir: ``student/`` (the best student by validation RSUM: safetensors + card),
``checkpoints/last.pt`` (everything to resume), ``train_log.csv`` (every loss, balancer weight and magnitude
and the learning rate per optimiser step), ``val_log.csv`` (Recall@K per epoch), ``summary.json`` and the same
numbers in ``metrics/`` (one file per measure, pipeline.dvc_metrics).

The Trainer puts the run together from parts with one job each: context.py (ranks, device, out_dir),
inputs.py (dataset, store rows, vocabulary, loaders), build.py (student, objective, optimiser, schedule),
resume.py (checkpoint and resume), logs.py (CSV, TensorBoard), loop.py (the steps of an epoch and the
non-finite guard) and validation.py (validation and the student kept).
"""

from __future__ import annotations

import json
import time

from pipeline.config import Config
from pipeline.console import console
from pipeline.dvc_metrics import write_by_measure
from stages.distill.build import build_parts
from stages.distill.context import start_run
from stages.distill.ddp import shutdown
from stages.distill.inputs import load_training_data
from stages.distill.logs import RunLogs
from stages.distill.loop import StepLoop
from stages.distill.resume import Checkpointer, Progress, config_digest
from stages.distill.validation import end_of_epoch, validate


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto"):
        self.cfg = cfg
        self.ctx = start_run(cfg)
        self.out, self.device, self.ranks = self.ctx.out, self.ctx.device, self.ctx.ranks
        self.data = load_training_data(self.ctx)
        digest = config_digest(cfg, self.data.ds.fingerprint, self.data.method.provenance())
        self.parts = build_parts(self.ctx, self.data)
        self.student, self.model = self.parts.student, self.parts.model
        self.progress = Progress()
        self.checkpoints = Checkpointer(self.ctx, self.parts, self.progress, digest)
        resumed = self.checkpoints.resume(resume)
        method, objective = self.data.method, self.parts.objective
        value_names = [*method.value_names(objective, self.device, self.data.dim), "total"]
        self.logs = RunLogs(self.ctx, value_names, objective.names, self.progress, resumed)
        # The loop saves through self._save, looked up at each call (a test wraps it).
        self.loop = StepLoop(self.ctx, self.data, self.parts, self.progress, self.logs, self.checkpoints,
                             value_names, lambda: self._save())

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    def _save(self) -> None:
        self.checkpoints.save()

    def validate(self) -> dict[str, float] | None:
        return validate(self.ctx, self.data, self.student)

    def train(self) -> dict:
        epochs, progress = self.cfg.distill.epochs, self.progress
        started = time.perf_counter()
        samples = 0
        if progress.epoch >= epochs:
            console.print(f"{self.out} already holds a finished run of {progress.epoch} epochs; nothing to do")
            shutdown(self.ranks)
            return self._summary(0, 0.0)
        while progress.epoch < epochs:
            samples += self.loop.run_epoch()
            self.parts.scheduler.step()
            self.parts.balancer.end_epoch()
            progress.epoch += 1
            progress.batch_in_epoch = 0
            end_of_epoch(self.ctx, self.data, self.student, progress, self.logs)
            self._save()
        seconds = time.perf_counter() - started
        summary = self._finish(samples, seconds)
        shutdown(self.ranks)
        return summary

    def _summary(self, samples: int, seconds: float) -> dict:
        return {
            "epochs": self.cfg.distill.epochs,
            "steps": self.progress.step,
            "best_epoch": self.progress.best_epoch,
            "best_val_rsum": self.progress.best_rsum,
            "train_pairs": int(len(self.data.train_pairs)),
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
                f"[green]distill done[/green]: {self.step} steps, best val RSUM {self.progress.best_rsum:.1f} "
                f"at epoch {self.progress.best_epoch}; student in {self.out / 'student'}"
            )
        return summary


def run_distill(cfg: Config, resume: str = "auto") -> dict:
    return Trainer(cfg, resume).train()
