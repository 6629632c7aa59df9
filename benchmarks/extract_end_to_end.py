"""End-to-end extraction throughput: the image path of `dsmd extract` (JPEG decoding in loader workers, teacher
forward, float16 store writes with fsync and marks) against the teacher alone on the same images, in one run.

The teacher is BEiT-3 with random weights (speed does not depend on them) and the dataset is synthetic: JPEGs of
COCO's typical size (640 x 480) written to a temporary directory, one caption each (captions are not timed).
Model-only runs the same images, decoded and transformed beforehand and held in (pinned) host memory, through
`encode_images` including the host-to-device copy and the copy of the embeddings back, as the stage does.

    python benchmarks/extract_end_to_end.py                  # CPU: BEiT-3 384 wide x 6 layers at 224 px, fp32
    python benchmarks/extract_end_to_end.py --model tiny     # CPU: 64 wide x 2 layers at 32 px (decode-bound)
    python benchmarks/extract_end_to_end.py --device cuda    # BEiT-3 giant at 384 px, bf16 (target: >= 80%)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, DataConfig, ExtractConfig, TeacherConfig  # noqa: E402
from pipeline.data.canonical import prepare_dataset  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.models.beit3 import BEiT3Config, BEiT3Retrieval, resolve_config  # noqa: E402
from pipeline.models.beit3_tokenizer import BEiT3Tokenizer  # noqa: E402
from pipeline.models.teachers import BEiT3Teacher  # noqa: E402
from stages.extract.worker import ExtractWorker, cpu_threads  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "beit3-tiny" / "tokenizer.spm"
MODELS = {
    "tiny": lambda: BEiT3Config(embed_dim=64, heads=4, ffn_dim=128, layers=2, img_size=32),
    "small": lambda: BEiT3Config(embed_dim=384, heads=6, ffn_dim=1536, layers=6, img_size=224),
    "giant": lambda: resolve_config("giant", img_size=384),
}


def _photo(index: int, size: tuple[int, int]) -> Image.Image:
    """A smooth colour field with texture: decodes like a photo (not like noise, which is far slower)."""
    rng = np.random.default_rng(index)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3) + 60 * np.sin(x[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3))
    base += 40 * np.cos(y[..., None] / rng.uniform(15, 60)) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def synthetic_dataset(root: Path, n: int, size: tuple[int, int]) -> DataConfig:
    images = root / "images"
    images.mkdir(parents=True)

    def write(i: int) -> dict:
        name = f"{i:06d}.jpg"
        _photo(i, size).save(images / name, format="JPEG", quality=90)
        return {"filename": name, "split": "train", "sentences": [{"raw": f"synthetic photo number {i}"}]}

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        entries = list(pool.map(write, range(n)))
    source = root / "dataset.json"
    source.write_text(json.dumps({"dataset": "synthetic", "images": entries}))
    data = DataConfig(source=str(source), images_root=str(images), canonical_dir=str(root / "canonical"),
                      name="synthetic-jpegs")
    prepare_dataset(data)
    return data


def random_teacher(model_cfg: BEiT3Config, device: torch.device, precision: str) -> BEiT3Teacher:
    torch.manual_seed(0)
    with torch.device(device):
        model = BEiT3Retrieval(model_cfg)
    return BEiT3Teacher(model, BEiT3Tokenizer(TOKENIZER, model_cfg.max_text_len), name="bench",
                        device=device, precision=precision)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(teacher: BEiT3Teacher, worker: ExtractWorker, batch: int, n_batches: int, repeats: int) -> float:
    """Images/s of encode_images over the first n_batches batches of the dataset, already in host memory."""
    pin = teacher.device.type == "cuda"
    batches = []
    for start in range(0, batch * n_batches, batch):
        ids = range(start, min(start + batch, worker.ds.num_images))
        pixels = torch.stack([teacher.image_transform(load_rgb(worker.ds.image_source(i))) for i in ids])
        batches.append(pixels.pin_memory() if pin else pixels)
    for pixels in batches[:2]:  # warm-up (kernel choice, allocator)
        teacher.encode_images(pixels).float().cpu()
    rates = []
    for _ in range(repeats):
        _sync(teacher.device)
        started = time.perf_counter()
        for pixels in batches:
            teacher.encode_images(pixels).float().cpu()
        rates.append(sum(len(p) for p in batches) / (time.perf_counter() - started))
    return statistics.median(rates)


def end_to_end(worker: ExtractWorker) -> tuple[float, int]:
    """Images/s of the stage's image path over the whole dataset into a fresh store (all image shards)."""
    tasks = [task for task in worker.plan() if task.kind == "image"]
    _sync(worker.device)
    started = time.perf_counter()
    result = worker.fill(tasks)
    _sync(worker.device)
    return result.rows_encoded / (time.perf_counter() - started), result.rows_encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", choices=sorted(MODELS), help="default: small on cpu, giant on cuda")
    parser.add_argument("--images", type=int, help="default: 192 on cpu, 4096 on cuda")
    parser.add_argument("--batch", type=int, help="image batch: default 16 on cpu, 64 on cuda")
    parser.add_argument("--loader-workers", type=int, help="default: 1 on cpu, cores - 2 (at most 14) on cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    cores = len(os.sched_getaffinity(0))
    model_name = args.model or ("giant" if cuda else "small")
    n_images = args.images or (4096 if cuda else 192)
    batch = args.batch or (64 if cuda else 16)
    loaders = args.loader_workers if args.loader_workers is not None else (min(14, max(1, cores - 2)) if cuda else 1)
    precision = "bf16" if cuda else "fp32"
    device = torch.device(args.device)
    threads = cpu_threads(0, loaders)
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory(prefix="dsmd-e2e-") as tmp:
        started = time.perf_counter()
        data = synthetic_dataset(Path(tmp), n_images, (640, 480))
        print(f"{n_images} JPEGs 640x480 written and prepared in {time.perf_counter() - started:.1f}s", flush=True)
        model_cfg = MODELS[model_name]()
        teacher = random_teacher(model_cfg, device, precision)
        cfg = Config(
            data=data,
            teacher=TeacherConfig(name="bench", img_size=model_cfg.img_size),
            extract=ExtractConfig(store=str(Path(tmp) / "features.zarr"), device=args.device, precision=precision,
                                  image_batch_size=batch, loader_workers=loaders, rows_per_shard=1024,
                                  rows_per_chunk=256),
        )
        with ExtractWorker(cfg, teacher=teacher) as worker:
            worker.prepare()
            model_rate = model_only(teacher, worker, batch, n_batches=min(10, n_images // batch), repeats=args.repeats)
            stage_rate, rows = end_to_end(worker)

    where = torch.cuda.get_device_name(device) if cuda else f"cpu ({cores} cores, {threads} torch threads)"
    row = {
        "device": where,
        "model": f"{model_name} ({model_cfg.embed_dim} wide x {model_cfg.layers}, {model_cfg.img_size} px)",
        "precision": precision,
        "batch": batch,
        "loader_workers": loaders,
        "images": rows,
        "model_only_img_per_s": model_rate,
        "end_to_end_img_per_s": stage_rate,
        "ratio": stage_rate / model_rate,
    }
    print(f"{row['model']} {precision} on {where}, batch {batch}, {loaders} loader workers: model-only "
          f"{model_rate:.1f} img/s, end to end {stage_rate:.1f} img/s over {rows} images -> "
          f"{100 * row['ratio']:.0f}% of model-only", flush=True)
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
