"""Teacher sections: the model alone (ours vs the torchscale-style attention), `dsmd extract` end to end against
the model alone on the same data, and the host memory of loading the checkpoint.

Weights are random (speed and memory do not depend on them). On the GPU the teacher is BEiT-3 giant at 384 px
in bf16; in a dry run a 64-wide, 2-layer BEiT-3 at 32 px in float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.extract_end_to_end import synthetic_dataset
from benchmarks.gpu_checks.common import Run, beit3_flops, free_memory, median, spread, time_calls
from benchmarks.gpu_checks.naive_attention import naive_attention
from benchmarks.teacher_load_memory import measure, write_random_checkpoint
from pipeline.config import Config, ExtractConfig, TeacherConfig
from pipeline.data.canonical import CanonicalDataset
from pipeline.data.images import load_rgb
from pipeline.models.beit3 import BEiT3Config, BEiT3Retrieval, resolve_config, write_config_json
from pipeline.models.teachers import load_teacher
from stages.demo.teacher import train_sentencepiece
from stages.extract.run import run_extract
from store import open_store

TINY = BEiT3Config(embed_dim=64, heads=4, ffn_dim=128, layers=2, img_size=32, vocab_size=200)


def model_config(run: Run) -> BEiT3Config:
    return resolve_config("giant", img_size=384) if run.cuda else TINY


def precision(run: Run) -> str:
    return "bf16" if run.cuda else "fp32"


def random_model(cfg: BEiT3Config, device: torch.device, dtype: torch.dtype) -> BEiT3Retrieval:
    with torch.device("meta"):
        model = BEiT3Retrieval(cfg)
    model = model.to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(0))
    return model.to(dtype).eval()


def teacher_model(run: Run) -> dict:
    """Images/s and captions/s of the retrieval encoders alone, inputs already on the device; ours against the
    torchscale-style attention over the same weights; achieved TFLOP/s from the counted FLOPs."""
    cfg, device = model_config(run), run.device
    dtype = torch.bfloat16 if run.cuda else torch.float32
    image_batch, text_batch, text_len = (64, 512, 64) if run.cuda else (4, 8, 16)
    warmup, repeats = (3, 10) if run.cuda else (1, 3)
    model = random_model(cfg, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    # Two input sets used in turn, random (not zeros, which can run faster than real data).
    pixels = [torch.randn(image_batch, 3, cfg.img_size, cfg.img_size, device=device, generator=gen).to(dtype)
              for _ in range(2)]
    ids = [torch.randint(3, cfg.vocab_size, (text_batch, text_len), device=device, generator=gen) for _ in range(2)]
    pad = torch.zeros(text_batch, text_len, dtype=torch.long, device=device)
    image_flops = beit3_flops(cfg, image_batch, cfg.num_patches + 1, image=True)
    text_flops = beit3_flops(cfg, text_batch, text_len, image=False)
    results: dict = {
        "model": f"BEiT-3 {cfg.embed_dim} wide x {cfg.layers} layers, {cfg.img_size} px",
        "parameters": sum(p.numel() for p in model.parameters()),
        "precision": "bf16" if run.cuda else "fp32",
        "image_batch": image_batch,
        "text_batch": text_batch,
        "text_tokens": text_len,
        "image_gflop_per_image": round(image_flops / image_batch / 1e9, 3),
        "text_gflop_per_caption": round(text_flops / text_batch / 1e9, 4),
    }
    outputs = {}
    with torch.inference_mode():
        for name in ("ours", "reference"):
            with naive_attention(model) if name == "reference" else contextlib.nullcontext():
                image_times = time_calls(lambda i: model.encode_image(pixels[i % 2]), device, warmup, repeats)
                text_times = time_calls(lambda i: model.encode_text(ids[i % 2], pad), device, warmup, repeats)
                outputs[name] = (model.encode_image(pixels[0]).float(), model.encode_text(ids[0], pad).float())
            results[name] = {
                "images_per_s": image_batch / median(image_times),
                "captions_per_s": text_batch / median(text_times),
                "image_tflops": image_flops / median(image_times) / 1e12,
                "text_tflops": text_flops / median(text_times) / 1e12,
                "image_of_bf16_peak": run.of_peak(image_flops / median(image_times) / 1e12),
                "text_of_bf16_peak": run.of_peak(text_flops / median(text_times) / 1e12),
                "image_spread": spread(image_times),
                "text_spread": spread(text_times),
            }
    results["speedup_images"] = results["ours"]["images_per_s"] / results["reference"]["images_per_s"]
    results["speedup_captions"] = results["ours"]["captions_per_s"] / results["reference"]["captions_per_s"]
    # Same function: the two attentions must give the same embeddings (up to the precision's rounding).
    results["min_cosine_ours_vs_reference"] = min(
        float((ours * ref).sum(-1).min()) for ours, ref in zip(outputs["ours"], outputs["reference"], strict=True)
    )
    if run.cuda:
        results["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return results


# ------------------------------------------------------------------------------------ checkpoint on disk


def teacher_files(run: Run) -> tuple[TeacherConfig, Path]:
    """A random checkpoint in the official layout (float32, as published), a tokenizer and a JSON config;
    written once per run (the end-to-end and memory sections share them). Returns the teacher settings and
    the JSON config path."""
    cfg = model_config(run)
    folder = run.work / "teacher"
    checkpoint, tokenizer, config = folder / "beit3.pth", folder / "beit3.spm", folder / "beit3.json"
    if not checkpoint.exists():
        folder.mkdir(parents=True, exist_ok=True)
        words = ["a", "photo", "of", "the", "synthetic", "number", "red", "green", "blue", "square", "circle",
                 "left", "right", "above", "below", "small", "large", "two", "three", "with"]
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(words, size=12)) for _ in range(500)]
        train_sentencepiece(texts, 64, tokenizer)
        write_config_json(cfg, config)
        partial = checkpoint.with_name("partial.pth")
        write_random_checkpoint(cfg, partial, device=str(run.device))
        partial.replace(checkpoint)
        free_memory(run.device)
    size = "giant" if run.cuda else str(config)
    teacher = TeacherConfig(name="beit3", checkpoint=str(checkpoint), size=size, tokenizer=str(tokenizer),
                            img_size=cfg.img_size, max_text_len=64 if run.cuda else 16)
    return teacher, config


def teacher_load_memory(run: Run) -> dict:
    """benchmarks/teacher_load_memory.py on the run's checkpoint: the peak host memory loading adds, over the
    file's size, the old way and the new (float32, and cast to bf16 while loading as a bf16 run does)."""
    started = time.perf_counter()
    teacher, config = teacher_files(run)
    checkpoint = Path(teacher.checkpoint)
    written = time.perf_counter() - started
    rows = measure(checkpoint, config, timeout=max(30.0, run.left() - 5))
    results: dict = {"checkpoint_bytes": checkpoint.stat().st_size, "checkpoint_written_s": round(written, 1)}
    for row in rows:
        results[row["mode"]] = {key: row[key] for key in ("ratio", "load_peak_bytes", "peak_rss_bytes", "seconds",
                                                          "dtype", "peak_reset")}
    return results


# ------------------------------------------------------------------------------------------ end to end


def _model_only(teacher, ds: CanonicalDataset, image_batch: int, text_batch: int, n_batches: int, run: Run):
    """(images/s, captions/s) of the teacher alone on this dataset's own images and captions, decoded and
    tokenised beforehand and held in (pinned) host memory; the copies to the device and of the embeddings
    back are included, as the stage does them."""
    pin = run.cuda
    ids = list(range(min(ds.num_images, image_batch * n_batches)))
    with ThreadPoolExecutor(max_workers=run.cores()) as pool:
        decoded = list(pool.map(lambda i: teacher.image_transform(load_rgb(ds.image_source(i))), ids))
    images = [torch.stack(decoded[s : s + image_batch]) for s in range(0, len(decoded), image_batch)]
    images = [b.pin_memory() if pin else b for b in images]
    texts = ds.texts(np.arange(min(ds.num_captions, text_batch * n_batches)))
    tokens = [teacher.tokenize(texts[s : s + text_batch]) for s in range(0, len(texts), text_batch)]
    warmup = 2 if run.cuda else 1
    image_times = time_calls(lambda i: teacher.encode_images(images[i % len(images)]).float().cpu(), run.device,
                             warmup, 2 * len(images))
    text_times = time_calls(lambda i: teacher.encode_texts(tokens[i % len(tokens)]).float().cpu(), run.device,
                            warmup, 2 * len(tokens))
    return len(images[0]) / median(image_times), len(tokens[0]["text_ids"]) / median(text_times)


def teacher_end_to_end(run: Run) -> dict:
    """`dsmd extract` (run_extract: loading the teacher from its checkpoint file, decoding JPEGs in loader
    workers, encoding, writing an HDF5 store with marks and checksums) on a generated dataset, against the
    teacher alone on the same images and captions. ratio = the time the model alone needs for all the rows over
    the stage's time for them (both without the load)."""
    n_images, size = (2000, (640, 480)) if run.cuda else (48, (64, 48))
    image_batch, text_batch = (64, 256) if run.cuda else (8, 16)
    root = run.work / "end_to_end"
    started = time.perf_counter()
    data = synthetic_dataset(root / "data", n_images, size)
    made_data = time.perf_counter() - started
    teacher_cfg, _ = teacher_files(run)
    made_teacher = time.perf_counter() - started - made_data
    loaders = min(14, max(1, run.cores() - 2)) if run.cuda else 0
    cfg = Config(
        data=data,
        teacher=teacher_cfg,
        extra_teachers=[],
        extract=ExtractConfig(store=str(root / "features.h5"), backend="hdf5", device=str(run.device),
                              precision=precision(run), image_batch_size=image_batch, text_batch_size=text_batch,
                              loader_workers=loaders, rows_per_shard=1024, rows_per_chunk=256),
    )
    ds = CanonicalDataset.load(data.canonical_dir)

    load_started = time.perf_counter()
    teacher = load_teacher(cfg.teacher, device=run.device, precision=precision(run))
    load_seconds = time.perf_counter() - load_started
    image_rate, text_rate = _model_only(teacher, ds, image_batch, text_batch, n_batches=10 if run.cuda else 2,
                                        run=run)
    del teacher
    free_memory(run.device)

    summary = run_extract(cfg)
    model_seconds = ds.num_images / image_rate + ds.num_captions / text_rate
    with open_store(cfg.extract.store, dataset_fingerprint=ds.fingerprint, teacher=teacher_cfg.name) as reader:
        rows = reader.get(teacher_cfg.name, "image", np.arange(ds.num_images))
    norms = np.linalg.norm(rows, axis=1)
    return {
        "images": ds.num_images,
        "captions": ds.num_captions,
        "image_size": f"{size[0]}x{size[1]} JPEG",
        "loader_workers": loaders,
        "image_batch": image_batch,
        "dataset_seconds": round(made_data, 1),
        "checkpoint_seconds": round(made_teacher, 1),
        "teacher_load_seconds": round(load_seconds, 1),
        "model_only_images_per_s": image_rate,
        "model_only_captions_per_s": text_rate,
        "model_only_seconds": model_seconds,
        "extract_fill_seconds": summary.fill_seconds,
        "extract_total_seconds": summary.seconds,
        "extract_rows_encoded": summary.rows_encoded,
        "extract_skipped": len(summary.skipped),
        "end_to_end_rows_per_s": summary.rows_encoded / summary.fill_seconds,
        "ratio": model_seconds / summary.fill_seconds,
        "stored_rows_unit_norm": bool(np.allclose(norms, 1.0, atol=1e-2)),
    }
