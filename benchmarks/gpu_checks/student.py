"""Student sections: the trainer's full step (`Trainer.train()`: loader workers decoding PNGs, tokenising,
teacher rows from an HDF5 store, copies, forward, DSMD losses, balancer, backward, AdamW, queue, per-step log)
against the bare step (the same model, losses, balancer and optimiser on one batch already on the device), as
benchmarks/distill_throughput.py measures them; eager, and with the student under torch.compile.

On the GPU: ViT-B/16 at 224 px + BERT-base, heads to 1408 (BEiT-3 giant's width), batch 256, bf16 autocast. In
a dry run: timm's test_vit and a one-layer BERT on the CPU.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.distill_throughput import CAPTIONS_PER_IMAGE, PRESETS, bare_step_rate, build_world, make_config
from benchmarks.distill_throughput import full_step_rate as trainer_loop_rate
from benchmarks.gpu_checks.common import Run
from stages.distill.inputs import train_loader
from stages.distill.train import Trainer


def _step_flops(trainer: Trainer) -> int:
    """FLOPs of one forward + backward of the bare step (counted by torch's FlopCounterMode on the eager model;
    on the CPU it does not count fused attention, so there the figure is a lower bound)."""
    batch = next(iter(train_loader(trainer.ctx, trainer.data, trainer.student, 0, 0)))
    trainer.student.train()
    with FlopCounterMode(display=False) as counter:
        _, total, _ = trainer.loop.forward(batch)
        total.backward()
    trainer.parts.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def student_step(run: Run, compiled: bool = False) -> dict:
    preset = "vitb" if run.cuda else "tiny"
    sizes = dict(PRESETS[preset])
    if run.cuda:
        sizes["dim"] = 1408
    else:
        sizes["batch"] = 16
    steps, warmup = (10, 3) if run.cuda else (2, 1)
    workers = min(12, max(1, run.cores() - 2)) if run.cuda else 0
    batch = sizes["batch"]
    n_train = math.ceil((warmup + 1 + steps) * batch / CAPTIONS_PER_IMAGE) + 1
    started = time.perf_counter()
    root = run.work / "student"
    canonical, store = build_world(root / preset, n_train, sizes["image_size"], sizes["dim"], store_suffix=".h5")
    world_seconds = time.perf_counter() - started
    args = SimpleNamespace(workers=workers, max_text_len=32, device=run.device.type)
    out = root / ("run-compiled" if compiled else "run-eager")
    cfg = make_config(args, sizes, canonical, store, out)

    torch.manual_seed(0)
    trainer = Trainer(cfg, resume="no")
    flops = _step_flops(trainer)
    if compiled:
        # The step loop calls parts.model: the compiled module shares the student's parameters. A dry run
        # traces with dynamo only (inductor's code generation takes minutes on a small CPU).
        backend = "inductor" if run.cuda else "eager"
        trainer.parts.model = trainer.model = torch.compile(trainer.student, backend=backend)
    compile_started = time.perf_counter()
    bare = bare_step_rate(trainer, steps, warmup)
    bare_seconds = time.perf_counter() - compile_started
    # The same trainer runs its own loop next (a fresh one would compile again): the bare steps changed its
    # weights and filled its queue, which changes the amount of work not at all (the queue has a fixed size).
    full, measured = trainer_loop_rate(trainer, warmup)
    flops_per_sample = flops / batch
    return {
        "student": f"{sizes['vision_model']} @{sizes['img_size']}/{sizes['patch_size']} + BERT "
                   f"{sizes['text_layers']}x{sizes['text_hidden']}, heads to {sizes['dim']}",
        "compiled": ("inductor" if run.cuda else "dynamo, eager backend") if compiled else False,
        "precision": sizes["precision"],
        "batch": batch,
        "parameters": sum(p.numel() for p in trainer.student.parameters()),
        "loader_workers": workers,
        "world_seconds": round(world_seconds, 1),
        "bare_phase_seconds": round(bare_seconds, 1),
        "steps_measured": measured,
        "gflop_per_sample": round(flops_per_sample / 1e9, 3),
        "bare_samples_per_s": bare,
        "full_samples_per_s": full,
        "full_over_bare": full / bare,
        "bare_tflops": bare * flops_per_sample / 1e12,
        "full_tflops": full * flops_per_sample / 1e12,
        "full_of_bf16_peak": run.of_peak(full * flops_per_sample / 1e12),
    }


def student_step_compiled(run: Run) -> dict:
    return student_step(run, compiled=True)
