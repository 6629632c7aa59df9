"""Validation after each epoch and the student it keeps: Recall@K on the val split (distill.val_ks), and the
best student by RSUM written whole to ``out_dir/student``."""

from __future__ import annotations

import os
import shutil

import numpy as np

from pipeline.console import console
from pipeline.encode import encode_images, encode_texts
from pipeline.models.student import Student, save_student
from pipeline.retrieval.metrics import retrieval_metrics
from stages.distill.checkpoint import write_failed
from stages.distill.context import RunContext
from stages.distill.ddp import barrier
from stages.distill.inputs import Tokenize, TrainingData
from stages.distill.logs import RunLogs
from stages.distill.resume import Progress


def validate(ctx: RunContext, data: TrainingData, student: Student) -> dict[str, float] | None:
    """Recall@K of the student on the usable val pairs; None when the split has none."""
    if len(data.val_images) == 0 or len(data.val_captions) == 0:
        return None
    dc, ds = ctx.cfg.distill, data.ds
    student.eval()
    image_emb, decoded = encode_images(
        student.encode_image,
        ds,
        data.val_images,
        student.image_transform(),
        dim=data.dim,
        batch_size=dc.val_batch_size,
        device=ctx.device,
        workers=dc.loader_workers,
    )
    text_emb = encode_texts(
        student.encode_text,
        Tokenize(student.tokenizer, ctx.cfg.student.max_text_len),
        ds.texts(data.val_captions),
        batch_size=dc.val_batch_size,
        device=ctx.device,
    )
    student.train()
    row_of = {int(image_id): row for row, image_id in enumerate(data.val_images)}
    caption_image = np.array([row_of[int(i)] for i in ds.caption_image_ids()[data.val_captions]])
    keep = decoded[caption_image]
    image_emb[~decoded] = 0.0
    return retrieval_metrics(image_emb, text_emb[keep], caption_image[keep], dc.val_ks)


def _card(ctx: RunContext, data: TrainingData, progress: Progress, metrics: dict | None) -> dict:
    cfg = ctx.cfg
    return {
        **data.method.card(),  # teacher, teacher_provenance, store
        "dataset": {"name": data.ds.name, "fingerprint": data.ds.fingerprint},
        "method": cfg.distill.method,
        "epoch": progress.epoch,
        "step": progress.step,
        "val_metrics": metrics or {},
    }


def save_best(ctx: RunContext, data: TrainingData, student: Student, progress: Progress,
              metrics: dict | None) -> None:
    """Write the student next to its final place and swap it in, so a kill never leaves half a student."""
    final = ctx.out / "student"
    staging = ctx.out / "student.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_student(student, staging, _card(ctx, data, progress, metrics))
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_failed(staging, exc, f"the previous student in {final} is kept") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)


def end_of_epoch(ctx: RunContext, data: TrainingData, student: Student, progress: Progress, logs: RunLogs) -> None:
    """Rank 0 validates, logs and keeps the student if it is the best so far (the last one without a val
    split); the other ranks wait for it."""
    if ctx.ranks.is_main:
        metrics = validate(ctx, data, student)
        if metrics is not None:
            logs.validation(progress, metrics)
            console.print(
                f"epoch {progress.epoch}: val RSUM {metrics['rsum']:.1f} "
                f"(i2t R@1 {metrics['i2t_r1']:.1f}, t2i R@1 {metrics['t2i_r1']:.1f})"
            )
            if metrics["rsum"] > progress.best_rsum:
                progress.best_rsum, progress.best_epoch = metrics["rsum"], progress.epoch
                save_best(ctx, data, student, progress, metrics)
        elif progress.epoch == ctx.cfg.distill.epochs:
            save_best(ctx, data, student, progress, None)
    barrier(ctx.ranks)
