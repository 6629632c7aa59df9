"""The run's checkpoint: what it holds, when it is due, saving it and resuming from it.

The file-level work (atomic write, safe load, RNG states) is stages.distill.checkpoint; this module decides
what goes in, whether a checkpoint may be resumed (same digest, finite weights) and restores the run from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass

import torch

from pipeline.config import Config
from pipeline.console import console
from pipeline.errors import DsmdError
from stages.distill.build import Parts
from stages.distill.checkpoint import LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from stages.distill.context import RunContext
from stages.distill.ddp import barrier
from stages.distill.guard import NonFiniteError, nonfinite_tensors

# Settings that change how a run executes but not what it computes: a checkpoint stays resumable across them.
# ``epochs`` is one of them: the first N epochs of a longer run are the N epochs of a shorter one (the
# learning-rate steps and balancer periods do not depend on the total), so a finished run can be extended.
RUNTIME_SETTINGS = {
    "device", "loader_workers", "checkpoint_every", "checkpoint_minutes", "out_dir", "tensorboard",
    "load_store_in_ram", "epochs", "val_batch_size",
}
# Settings added after checkpoints were already being written, with the value that trains as before they
# existed: left out of the digest at that value, so that a checkpoint written before them still resumes.
ADDED_LATER = {
    "distill": {"views": "plain", "view_order": "random", "order": "shuffle", "order_block_rows": 0,
                "order_window": 8},
    "student": {"vision_width": 0, "vision_depth": 0, "vision_heads": 0},
}


def config_digest(cfg: Config, dataset_fingerprint: str, teacher_provenance: dict | None = None) -> str:
    """What a checkpoint must agree on to be resumed: student and training settings, the dataset and how the
    teacher features were made (a store re-extracted with another checkpoint gives other targets)."""
    distill = {k: v for k, v in dataclasses.asdict(cfg.distill).items() if k not in RUNTIME_SETTINGS}
    payload = {
        "student": _without_neutral(dataclasses.asdict(cfg.student), ADDED_LATER["student"]),
        "distill": _without_neutral(distill, ADDED_LATER["distill"]),
        "dataset": dataset_fingerprint,
        "teacher": teacher_provenance or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _without_neutral(settings: dict, neutral: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in neutral or v != neutral[k]}


@dataclass
class Progress:
    """Where the run stands; saved in and restored from the checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_rsum: float = -1.0
    best_epoch: int = -1


class Checkpointer:
    def __init__(self, ctx: RunContext, parts: Parts, progress: Progress, digest: str):
        self.ctx, self.parts, self.progress, self.digest = ctx, parts, progress, digest
        self.path = ctx.out / "checkpoints" / LAST
        self.saved_step, self.saved_at = 0, time.monotonic()

    def state(self) -> dict:
        parts, progress = self.parts, self.progress
        return {
            "digest": self.digest,
            "model": parts.student.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "losses": parts.objective.state_dict(),
            "balancer": parts.balancer.state_dict(),
            "rng": rng_state(),
            "progress": {"epoch": progress.epoch, "batch_in_epoch": progress.batch_in_epoch, "step": progress.step},
            "best": {"rsum": progress.best_rsum, "epoch": progress.best_epoch},
        }

    def save(self) -> None:
        if self.ctx.ranks.is_main:
            bad = nonfinite_tensors(self.parts.weights())
            if bad:  # the step checks should have stopped the run before; never overwrite a good checkpoint
                raise NonFiniteError(
                    f"not saving {self.path}: non-finite weights in {', '.join(bad[:5])} at "
                    f"step {self.progress.step}; lower distill.lr or use precision fp32"
                )
            save_checkpoint(self.path, self.state())
        self.saved_step, self.saved_at = self.progress.step, time.monotonic()
        barrier(self.ctx.ranks)

    def due_by_time(self) -> bool:
        """distill.checkpoint_minutes passed since the last save. Under DDP rank 0's clock decides for all, so
        every rank reaches the save's barrier."""
        minutes = self.ctx.cfg.distill.checkpoint_minutes
        if minutes <= 0:
            return False
        due = torch.tensor([time.monotonic() - self.saved_at >= minutes * 60], device=self.ctx.device)
        if self.ctx.ranks.distributed:
            torch.distributed.broadcast(due, src=0)
        return bool(due)

    def kept(self) -> str:
        """What a failing run leaves behind, for its message."""
        if self.path.exists():
            return f"the last checkpoint ({self.path}, step {self.saved_step}) is untouched"
        return "no checkpoint was saved"

    def resume(self, mode: str) -> bool:
        """Restore the run from the checkpoint when ``mode`` (auto | yes | no) and the checkpoint allow it."""
        path = self.path
        if mode == "no" or (mode == "auto" and not path.exists()):
            return False
        state = load_checkpoint(path)
        learned = {name for name, _ in self.parts.objective.named_parameters()}
        bad = nonfinite_tensors(state.get("model", {}))
        bad += [f"objective.{k}" for k in nonfinite_tensors(state.get("losses", {})) if k in learned]
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
            if mode == "yes":
                raise DsmdError(message + " (run without --resume to start over)")
            console.print(f"[yellow]{message}: starting a fresh run[/yellow]")
            return False
        if state["progress"]["epoch"] >= self.ctx.cfg.distill.epochs and not (self.ctx.out / "student").is_dir():
            # DVC removes a stage's outputs before it reruns it (a code dependency changed): "nothing to do" would
            # leave no student, and the checkpoint holds the last weights, not the best. Training is repeatable.
            message = f"{path} holds a finished run, but its student ({self.ctx.out / 'student'}) is gone"
            if mode == "yes":
                raise DsmdError(message + ": run without --resume to train it again")
            console.print(f"[yellow]{message}: training again from the start[/yellow]")
            return False
        parts = self.parts
        parts.student.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.scaler.load_state_dict(state["scaler"])
        parts.objective.load_state_dict(state["losses"])
        parts.balancer.load_state_dict(state["balancer"])
        set_rng_state(state["rng"])
        progress = self.progress
        saved = state["progress"]
        progress.epoch, progress.batch_in_epoch, progress.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
        progress.best_rsum, progress.best_epoch = state["best"]["rsum"], state["best"]["epoch"]
        self.saved_step = progress.step
        console.print(f"resuming {path}: epoch {progress.epoch}, batch {progress.batch_in_epoch}, step {progress.step}")
        return True
