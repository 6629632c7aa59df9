"""Distillation step throughput: the trainer's real loop against the bare model step, in the same run.

Full step: `Trainer.train()` itself, i.e. loading images from the canonical dataset and decoding them in the
loader workers, tokenising, fetching the teacher rows by id from the store, the copies to the device, the
student's forward, the DSMD losses, the balancer, backward, the optimiser step, the CD queue update and the
per-step log. Timestamps are taken after each optimiser step (after a device synchronisation, which the loop's
per-step log does anyway), the first `--warmup` steps are left out.

Bare step: the same model, losses, balancer and optimiser on one batch that is already on the device:
forward + losses + balancer + backward + optimiser step, one synchronisation per step as in the loop.

The ratio full / bare says how much of the model's speed the data path and the bookkeeping keep.

Guard: the non-finite guard's cost (stages/distill/guard.py), two ways in the same run. `guard_share` is the
time spent inside the loop's two checks (teacher rows of the batch, losses + gradient norm before the step;
the device is synchronised before each so its queued work is not billed to the check) over the loop's time.
`guard_on_over_off` is the full step rate with the guard against a fresh trainer whose checks, the collate's
row check included, are switched off. The issue's bar: the full step within 2% of the unguarded one.

    python benchmarks/distill_throughput.py                        # CPU: tiny and demo-size students
    python benchmarks/distill_throughput.py --preset demo --threads 1
    python benchmarks/distill_throughput.py --device cuda           # also ViT-B/16 + BERT-base, batch 256, bf16

The data are a generated shapes world (PNG images, 5 captions each) and a store of random unit features of
the teacher's width; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stages.distill.data as distill_data  # noqa: E402
from pipeline.config import Config, DataConfig, DemoConfig, StudentConfig  # noqa: E402
from pipeline.data.canonical import CanonicalDataset, prepare_dataset  # noqa: E402
from stages.demo.shapes import generate_shapes  # noqa: E402
from stages.distill.inputs import train_loader  # noqa: E402
from stages.distill.train import Trainer  # noqa: E402
from store import FeatureStore  # noqa: E402

# Student sizes, batch, teacher width and the size the images are rendered at (the loader resizes them).
PRESETS = {
    "tiny": dict(vision_model="test_vit", vision_width=0, vision_depth=0, vision_heads=0, img_size=32,
                 patch_size=8, text_hidden=32, text_layers=1, text_heads=2,
                 batch=32, dim=64, image_size=32, precision="fp32"),
    # StudentConfig's defaults: the demo's student.
    "demo": dict(vision_model="vit_tiny_patch16_224", vision_width=96, vision_depth=4, vision_heads=3, img_size=64,
                 patch_size=16, text_hidden=96, text_layers=2, text_heads=3, batch=64, dim=256, image_size=64,
                 precision="fp32"),
    "vitb": dict(vision_model="vit_base_patch16_224", vision_width=0, vision_depth=0, vision_heads=0, img_size=224,
                 patch_size=16, text_hidden=768, text_layers=12,
                 text_heads=12, batch=256, dim=768, image_size=256, precision="bf16"),
}
TEACHER = "bench"
CAPTIONS_PER_IMAGE = 5
VAL_IMAGES = 8


def build_world(root: Path, n_train: int, image_size: int, dim: int, store_suffix: str = ".zarr") -> tuple[Path, Path]:
    """Shapes images + canonical dataset + a store of random unit teacher features; reused when present.
    store_suffix ".h5" makes an HDF5 store (where zarr is not installed)."""
    canonical, store_path = root / "canonical", root / f"store-{dim}{store_suffix}"
    marker = root / f"ready-{n_train}-{image_size}-{dim}{store_suffix}"
    if marker.exists():
        return canonical, store_path
    demo = DemoConfig(out_dir=str(root / "shapes"), n_train=n_train, n_val=VAL_IMAGES, n_test=0,
                      image_size=image_size, captions_per_image=CAPTIONS_PER_IMAGE)
    source = generate_shapes(demo)
    prepare_dataset(DataConfig(source=str(source), images_root=str(root / "shapes" / "images"),
                               canonical_dir=str(canonical), name="bench"))
    ds = CanonicalDataset.load(canonical)
    rng = np.random.default_rng(0)
    with FeatureStore.create_or_open(store_path, dataset_fingerprint=ds.fingerprint, n_images=ds.num_images,
                                     n_captions=ds.num_captions, rows_per_shard=4096, rows_per_chunk=256) as store:
        for kind in ("image", "text"):
            store.ensure_array(TEACHER, kind, dim, provenance={"teacher": {"name": "random"}})
            for shard in store.pending_shards(TEACHER, kind):
                start, stop = store.shard_rows(TEACHER, kind, shard)
                rows = rng.standard_normal((stop - start, dim)).astype(np.float32)
                store.write_shard(TEACHER, kind, shard, rows / np.linalg.norm(rows, axis=1, keepdims=True))
    marker.write_text("ok\n")
    return canonical, store_path


def make_config(args, sizes: dict, canonical: Path, store_path: Path, out_dir: Path) -> Config:
    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, canonical_dir=str(canonical))
    cfg.extract = dataclasses.replace(cfg.extract, store=str(store_path))
    cfg.student = StudentConfig(vision_model=sizes["vision_model"], vision_width=sizes["vision_width"],
                                vision_depth=sizes["vision_depth"], vision_heads=sizes["vision_heads"],
                                img_size=sizes["img_size"],
                                patch_size=sizes["patch_size"], text_hidden=sizes["text_hidden"],
                                text_layers=sizes["text_layers"], text_heads=sizes["text_heads"],
                                max_text_len=args.max_text_len)
    cfg.distill = dataclasses.replace(
        cfg.distill, teacher=TEACHER, out_dir=str(out_dir), epochs=1, batch_size=sizes["batch"],
        loader_workers=args.workers, device=args.device, precision=sizes["precision"], checkpoint_every=0,
        lr_step_epochs=[100],
    )
    cfg.evaluate = dataclasses.replace(cfg.evaluate, batch_size=sizes["batch"])
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def full_step_rate(trainer: Trainer, warmup: int) -> tuple[float, int]:
    """Pairs/s of the trainer's own loop over one epoch, from timestamps after each optimiser step."""
    stamps: list[float] = []
    step = trainer.loop.optimizer_step

    def timed_step() -> None:
        step()
        _sync(trainer.device)
        stamps.append(time.perf_counter())

    trainer.loop.optimizer_step = timed_step
    trainer.train()
    measured = len(stamps) - 1 - warmup
    if measured < 1:
        raise SystemExit(f"only {len(stamps)} steps ran; raise --steps")
    return trainer.cfg.distill.batch_size * measured / (stamps[-1] - stamps[warmup]), measured


def guarded_step_rate(trainer: Trainer, warmup: int) -> tuple[float, float]:
    """The loop's rate, and the share of its time spent in the guard's two per-step checks."""
    spent = [0.0]
    loop = trainer.loop

    def timed(check):
        def run(*args):
            _sync(trainer.device)
            started = time.perf_counter()
            check(*args)
            spent[0] += time.perf_counter() - started
        return run

    loop.check_teacher_rows = timed(loop.check_teacher_rows)
    loop.check_finite_step = timed(loop.check_finite_step)
    started = time.perf_counter()
    rate, _ = full_step_rate(trainer, warmup)
    return rate, spent[0] / (time.perf_counter() - started)


def unguarded_step_rate(cfg: Config, warmup: int) -> float:
    """The loop's rate with every guard check switched off (loader workers fork, so they see the patch)."""
    original = distill_data.bad_teacher_rows
    distill_data.bad_teacher_rows = lambda rows, ids, *a, **k: []
    try:
        torch.manual_seed(0)
        trainer = Trainer(cfg, resume="no")
        trainer.loop.check_teacher_rows = lambda batch: None
        trainer.loop.check_finite_step = lambda sums, batches: None
        return full_step_rate(trainer, warmup)[0]
    finally:
        distill_data.bad_teacher_rows = original


def bare_step_rate(trainer: Trainer, steps: int, warmup: int) -> float:
    """Pairs/s of forward + losses + balancer + backward + optimiser step on one batch held on the device."""
    batch = next(iter(train_loader(trainer.ctx, trainer.data, trainer.student, 0, 0)))
    dev = trainer.device
    batch = dataclasses.replace(
        batch,
        pixels=batch.pixels.to(dev), tokens={k: v.to(dev) for k, v in batch.tokens.items()},
        teacher_image=batch.teacher_image.to(dev), teacher_text=batch.teacher_text.to(dev),
        image_ids=batch.image_ids.to(dev),
    )
    parts = trainer.parts
    parts.model.train()
    stamps = []
    for _ in range(warmup + 1 + steps):
        values, total, teacher = trainer.loop.forward(batch)
        parts.scaler.scale(total).backward()
        parts.objective.enqueue(*teacher)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
        float(total.detach())  # the loop's per-step log syncs once per step too
        stamps.append(time.perf_counter())
    return trainer.cfg.distill.batch_size * steps / (stamps[-1] - stamps[warmup])


def run_preset(name: str, args, root: Path) -> dict:
    sizes = dict(PRESETS[name])
    for key in ("vision_model", "img_size", "patch_size", "text_hidden", "text_layers", "text_heads", "batch", "dim",
                "image_size", "precision"):
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    batch = sizes["batch"]
    n_train = math.ceil((args.warmup + 1 + args.steps) * batch / CAPTIONS_PER_IMAGE) + 1
    canonical, store_path = build_world(root, n_train, sizes["image_size"], sizes["dim"])
    out_dir = Path(tempfile.mkdtemp(prefix=f"run-{name}-", dir=root))
    cfg = make_config(args, sizes, canonical, store_path, out_dir)

    torch.manual_seed(0)
    trainer = Trainer(cfg, resume="no")
    bare = bare_step_rate(trainer, args.steps, args.warmup)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # A fresh trainer for the real loop: the bare steps must not have moved its model or queues.
    trainer = Trainer(cfg, resume="no")
    full, measured = full_step_rate(trainer, args.warmup)
    device = trainer.device
    # Guard on and off, alternating in fresh output folders, so that drift on a busy machine hits both.
    on, off, shares = [], [], []
    for repeat in range(args.guard_repeats):
        for guarded in (True, False):
            cfg_g = dataclasses.replace(cfg)
            cfg_g.distill = dataclasses.replace(cfg.distill, out_dir=str(out_dir / f"guard-{guarded}-{repeat}"))
            if guarded:
                torch.manual_seed(0)
                rate, share = guarded_step_rate(Trainer(cfg_g, resume="no"), args.warmup)
                on.append(rate)
                shares.append(share)
            else:
                off.append(unguarded_step_rate(cfg_g, args.warmup))
    row = {
        "preset": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": sizes["precision"],
        "batch": batch,
        "student": f"{sizes['vision_model']} @{sizes['img_size']}/{sizes['patch_size']} + BERT "
                   f"{sizes['text_layers']}x{sizes['text_hidden']}",
        "parameters": sum(p.numel() for p in trainer.student.parameters()),
        "loader_workers": args.workers,
        "steps_measured": measured,
        "bare_pairs_per_s": round(bare, 2),
        "full_pairs_per_s": round(full, 2),
        "full_over_bare": round(full / bare, 3),
        "guard_share": round(float(np.median(shares)), 4) if shares else None,
        "guard_on_over_off": round(float(np.median(on) / np.median(off)), 3) if on else None,
    }
    print(f"{name:<6} {row['device']:<22} {row['precision']:<5} batch {batch:>4}  {row['student']:<46} "
          f"bare {bare:9.1f} pairs/s   full {full:9.1f} pairs/s   full/bare {full / bare:.1%}", flush=True)
    if on:
        print(f"{'':<6} guard: {row['guard_share']:.2%} of the loop's time in its checks; full step guard on / off "
              f"{row['guard_on_over_off']:.3f} (median of {len(on)} each)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="sizes to run (repeatable); default: tiny and demo, plus vitb with --device cuda")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each mode")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: 2 on CPU, 12 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--max-text-len", type=int, default=32)
    parser.add_argument("--guard-repeats", type=int, default=3, help="guard on/off pairs (0: skip the guard part)")
    parser.add_argument("--work", type=Path, help="where the generated data go (kept and reused); default: a temp dir")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    # Overrides of a preset's sizes.
    parser.add_argument("--vision-model", dest="vision_model")
    parser.add_argument("--img-size", dest="img_size", type=int)
    parser.add_argument("--patch-size", dest="patch_size", type=int)
    parser.add_argument("--text-hidden", dest="text_hidden", type=int)
    parser.add_argument("--text-layers", dest="text_layers", type=int)
    parser.add_argument("--text-heads", dest="text_heads", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dim", type=int, help="teacher feature width")
    parser.add_argument("--image-size", dest="image_size", type=int, help="side of the generated images")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = 12 if args.device == "cuda" else 2
    presets = args.preset or (["tiny", "demo", "vitb"] if args.device == "cuda" else ["tiny", "demo"])

    rows = []
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as scratch:
        root = args.work or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for name in presets:
            rows.append(run_preset(name, args, root / name))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
