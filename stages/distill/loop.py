"""One epoch of optimiser steps: forward over the global batch, the method's losses, the balancer, gradient
accumulation, the non-finite guard (stages.distill.guard) before every step, the step's log row and the
checkpoints due within the epoch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.console import make_progress
from pipeline.errors import DsmdError
from stages.distill.build import Parts
from stages.distill.context import RunContext, autocast
from stages.distill.ddp import gather_plain, gather_with_grad
from stages.distill.guard import NonFiniteError, grad_norm
from stages.distill.inputs import TrainingData, steps_per_epoch, train_loader
from stages.distill.logs import RunLogs
from stages.distill.resume import Checkpointer, Progress


class StepLoop:
    """``save`` writes the checkpoint (the trainer's, looked up at each call)."""

    def __init__(self, ctx: RunContext, data: TrainingData, parts: Parts, progress: Progress, logs: RunLogs,
                 checkpoints: Checkpointer, value_names: list[str], save: Callable[[], None]):
        self.ctx, self.data, self.parts, self.progress = ctx, data, parts, progress
        self.logs, self.checkpoints, self.value_names, self.save = logs, checkpoints, value_names, save

    def check_equal_batches(self, batch) -> None:
        """Under DDP every rank must bring a full slice (the gathers need equal sizes). A rank that dropped an
        image that no longer decodes must not leave the others waiting in a gather: all ranks learn of it
        through one small collective and stop together."""
        ranks = self.ctx.ranks
        if not ranks.distributed:
            return
        count = torch.tensor([len(batch.image_ids)], device=self.ctx.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        if int(count) != self.ctx.micro_batch // ranks.world:
            raise DsmdError(
                "an image failed to decode during multi-process training (the images changed after extraction); "
                "run `dsmd data check`, then `dsmd extract`"
            )

    def forward(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple]:
        dev, ranks, parts = self.ctx.device, self.ctx.ranks, self.parts
        self.check_equal_batches(batch)
        pixels = batch.pixels.to(dev, non_blocking=True)
        tokens = {k: v.to(dev, non_blocking=True) for k, v in batch.tokens.items()}
        with autocast(dev, self.ctx.cfg.distill.precision):
            s_v, s_t = parts.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        # Losses in float32, over the global batch: in-batch negatives come from every rank.
        s_v = gather_with_grad(s_v.float(), ranks)
        s_t = gather_with_grad(s_t.float(), ranks)
        ids = gather_plain(batch.image_ids.to(dev), ranks)
        values, teacher = self.data.method.losses(
            parts.objective, s_v, s_t, batch, dev, ids, lambda x: gather_plain(x, ranks)
        )
        total = parts.balancer(parts.objective.top_level(values))
        return values, total, teacher

    def where(self, batches: list) -> str:
        captions = torch.cat([b.caption_ids for b in batches]).tolist()
        images = sorted(set(torch.cat([b.image_ids for b in batches]).tolist()))

        def listed(ids: list[int]) -> str:
            return ", ".join(map(str, ids[:16])) + (f", ... ({len(ids)} in all)" if len(ids) > 16 else "")

        return (f"step {self.progress.step + 1} (epoch {self.progress.epoch + 1}), caption ids [{listed(captions)}], "
                f"image ids [{listed(images)}]; {self.checkpoints.kept()}")

    def check_teacher_rows(self, batch) -> None:
        if batch.bad_rows:
            raise NonFiniteError(
                f"non-finite or non-unit teacher features in {self.ctx.cfg.extract.store}: "
                f"{'; '.join(batch.bad_rows)} at {self.where([batch])}. Run `dsmd store verify`, then "
                "`dsmd extract --repair` (or re-extract those shards) and rerun distill"
            )

    def check_finite_step(self, sums: torch.Tensor, batches: list) -> None:
        """Before the optimiser applies the step: every loss finite and, unless the fp16 scaler (which skips
        such steps itself) is on, the gradient norm finite. One host sync."""
        checks = [torch.isfinite(sums).all()]
        if not self.parts.scaler.is_enabled():
            checks.append(torch.isfinite(grad_norm(self.parts.parameters())).to(sums.device))
        finite = torch.stack(checks).all()
        if bool(finite):
            return
        losses = dict(zip(self.value_names, sums.tolist(), strict=True))
        bad = ", ".join(f"{name} {value}" for name, value in losses.items() if not np.isfinite(value))
        what = f"loss ({bad})" if bad else "gradient"
        raise NonFiniteError(
            f"non-finite {what} at {self.where(batches)}. Lower distill.lr, check the data of that batch, or "
            "use precision fp32; resuming restarts from the last checkpoint"
        )

    def optimizer_step(self) -> None:
        parts = self.parts
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        self.data.method.after_step(parts.objective)
        parts.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        parts.balancer.end_step()

    def run_epoch(self) -> int:
        """The rest of the current epoch, from the batch the progress stands at; returns the pairs trained."""
        dc, parts, progress = self.ctx.cfg.distill, self.parts, self.progress
        parts.model.train()
        loader = train_loader(self.ctx, self.data, parts.student, progress.epoch, progress.batch_in_epoch)
        distributed = self.ctx.ranks.distributed
        samples = 0
        # Losses summed on the device over the micro-batches of a step: one host sync per step, not per value.
        sums: torch.Tensor | None = None
        micro_in_step = 0
        step_batches: list = []  # the micro-batches of the step, named if it goes non-finite
        with make_progress() as bar:
            task = bar.add_task(
                f"epoch {progress.epoch + 1}/{dc.epochs}",
                total=steps_per_epoch(self.ctx, self.data),
                completed=progress.batch_in_epoch // dc.grad_accum,
                rate="",
            )
            step_started = time.perf_counter()
            for batch in loader:
                sync = micro_in_step + 1 == dc.grad_accum
                no_sync = parts.model.no_sync if distributed and not sync else contextlib.nullcontext
                self.check_teacher_rows(batch)
                step_batches.append(batch)
                with no_sync():
                    values, total, teacher = self.forward(batch)
                    parts.scaler.scale(total / dc.grad_accum).backward()
                parts.objective.enqueue(*teacher)
                step_values = torch.stack([*(values[n].detach() for n in self.value_names[:-1]), total.detach()])
                sums = step_values if sums is None else sums + step_values
                micro_in_step += 1
                progress.batch_in_epoch += 1
                if not sync:
                    continue
                self.check_finite_step(sums, step_batches)
                step_batches = []
                self.optimizer_step()
                elapsed = time.perf_counter() - step_started
                rate = dc.batch_size / elapsed if elapsed > 0 else 0.0
                samples += dc.batch_size
                means = dict(zip(self.value_names, (sums / micro_in_step).tolist(), strict=True))
                self.logs.step(progress, parts.optimizer.param_groups[0]["lr"], means, parts.balancer, rate)
                sums, micro_in_step = None, 0
                bar.update(task, advance=1, rate=f"{rate:.0f} pairs/s")
                every = dc.checkpoint_every
                if self.checkpoints.due_by_time() or (every > 0 and progress.step % every == 0):
                    self.save()
                step_started = time.perf_counter()
        return samples
