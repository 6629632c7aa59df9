"""A short real run of the demo with the student on the GPU: the shapes world, the canonical dataset, the demo
teacher fitted on the CPU (fewer epochs than the demo's six), `dsmd extract` into an HDF5 store on the GPU and
`dsmd distill` for a few epochs on the GPU; the same library calls the commands make.

What it shows: the pipeline runs on the device image as it is, the student learns (validation RSUM per epoch,
against chance), and how fast the demo-size loop goes there. A dry run shrinks everything to seconds on the CPU.
"""

from __future__ import annotations

import csv
import time

from benchmarks.gpu_checks.common import Run
from pipeline.config import (
    Config,
    DataConfig,
    DemoConfig,
    DemoTeacherConfig,
    DistillConfig,
    ExtractConfig,
    StudentConfig,
    TeacherConfig,
)
from pipeline.data.canonical import CanonicalDataset, prepare_dataset
from pipeline.retrieval.metrics import chance_metrics
from stages.demo.shapes import generate_shapes
from stages.demo.teacher import fit_demo_teacher
from stages.distill.train import run_distill
from stages.extract.run import run_extract


def demo_config(run: Run) -> Config:
    root = run.work / "demo"
    shapes, teacher = root / "shapes", root / "teacher"
    cfg = Config(
        data=DataConfig(source=str(shapes / "dataset_shapes.json"), images_root=str(shapes / "images"),
                        canonical_dir=str(root / "canonical"), name="shapes"),
        demo=DemoConfig(out_dir=str(shapes)),
        teacher=TeacherConfig(checkpoint=str(teacher / "demo_beit3.pth"), size=str(teacher / "demo_beit3.json"),
                              tokenizer=str(teacher / "demo_beit3.spm")),
        extra_teachers=[],
        demo_teacher=DemoTeacherConfig(out_dir=str(teacher), epochs=3),
        extract=ExtractConfig(store=str(root / "features.h5"), backend="hdf5", device=str(run.device),
                              loader_workers=4),
        distill=DistillConfig(out_dir=str(root / "distill"), epochs=3, device=str(run.device), loader_workers=8,
                              checkpoint_every=0, lr_step_epochs=[100]),
    )
    if not run.dry:
        return cfg
    cfg.demo = DemoConfig(out_dir=str(shapes), n_train=48, n_val=16, n_test=0, image_size=32)
    cfg.teacher.img_size = 32
    cfg.teacher.max_text_len = 24
    cfg.demo_teacher = DemoTeacherConfig(out_dir=str(teacher), embed_dim=32, layers=1, heads=2, ffn_dim=64,
                                         vocab_size=64, epochs=1, batch_size=64)
    cfg.extract = ExtractConfig(store=str(root / "features.h5"), backend="hdf5", device="cpu", loader_workers=0,
                                image_batch_size=32, text_batch_size=64)
    cfg.student = StudentConfig(vision_model="test_vit", vision_width=0, vision_depth=0, vision_heads=0,
                                img_size=32, patch_size=8, text_hidden=32, text_layers=1,
                                text_heads=2, max_text_len=24)
    cfg.distill = DistillConfig(out_dir=str(root / "distill"), epochs=1, batch_size=32, device="cpu",
                                loader_workers=0, checkpoint_every=0, lr_step_epochs=[100], val_batch_size=64)
    cfg.distill.losses.queue_size = 64
    return cfg


def demo_distill(run: Run) -> dict:
    cfg = demo_config(run)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        seconds[name] = round(now - started, 1)
        started = now

    generate_shapes(cfg.demo)
    prepare_dataset(cfg.data)
    lap("data")
    dataset = CanonicalDataset.load(cfg.data.canonical_dir)
    fit = fit_demo_teacher(cfg, dataset)
    lap("teacher_fit_cpu")
    extract = run_extract(cfg)
    lap("extract")
    summary = run_distill(cfg, resume="no")
    lap("distill")
    with open(f"{cfg.distill.out_dir}/val_log.csv", newline="") as handle:
        val_rsum = [round(float(row["rsum"]), 1) for row in csv.DictReader(handle)]
    val = dataset.image_ids("val")
    caption_image = dataset.caption_image_ids()
    val_captions = dataset.caption_ids("val")
    row_of = {int(image): row for row, image in enumerate(val)}
    chance = chance_metrics(len(val), [row_of[int(i)] for i in caption_image[val_captions]], cfg.distill.val_ks)
    return {
        "images": dataset.num_images,
        "captions": dataset.num_captions,
        "teacher_fit_steps": fit.steps,
        "teacher_fit_last_loss": round(fit.epoch_losses[-1], 4),
        "extract_rows_per_s": extract.rows_encoded / extract.fill_seconds if extract.fill_seconds else None,
        "distill_epochs": cfg.distill.epochs,
        "distill_steps": summary["steps"],
        "distill_pairs_per_s": summary["pairs_per_s"],
        "val_rsum_per_epoch": val_rsum,
        "val_rsum_chance": round(chance["rsum"], 1),
        "best_val_rsum": summary["best_val_rsum"],
        "seconds": seconds,
    }
