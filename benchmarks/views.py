"""Training step time with stored teacher views (distill.views) against without, side by side in one run.

The trainer's real loop (`Trainer.train()`, as benchmarks/distill_throughput.py times it: decoding in loader
workers, collate, store reads, forward, losses, backward, optimiser step) on the same data and student, with
distill.views = plain, replay and mismatch. What views add per step: reading the crop box, cropping the decoded
image before the student's resize, and (replay) fetching K x D teacher values per image instead of D and keeping
one view. The modes alternate for --repeats rounds in fresh output folders, so that drift on a busy machine hits
every mode. Reported per mode: the median and the best round (another process can only slow a round down, so on
a loaded machine the best round is the steadier figure), and from each the ratios replay / plain and
mismatch / plain of the step time.

    python benchmarks/views.py                            # CPU, tiny student, K = 8
    python benchmarks/views.py --preset demo --views 4 --threads 1

Second, steadier on a busy machine: the data path alone (a batch's items read, decoded, cropped and transformed,
then collated with its teacher rows, in this process), the modes alternating batch by batch so that drift
hits them alike, median per mode; and the bare model step of the same batch size (distill_throughput's
bare_step_rate), which does not depend on the mode. Their sums estimate the step time of a loop that loads
in-process; `data_*_over_plain` and `inprocess_step_*_over_plain` are those ratios.

The store holds random unit features of the teacher's width for the plain images and for K views of each
training image, and real boxes drawn by pipeline.data.views (the image sizes are the generated ones); nothing is
downloaded and no teacher runs.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_throughput import (  # noqa: E402
    CAPTIONS_PER_IMAGE,
    PRESETS,
    TEACHER,
    bare_step_rate,
    build_world,
    full_step_rate,
    make_config,
)

from pipeline.data.canonical import CanonicalDataset  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.data.views import draw_boxes  # noqa: E402
from stages.distill.data import PairRows  # noqa: E402
from stages.distill.inputs import Tokenize  # noqa: E402
from stages.distill.methods import method_for  # noqa: E402
from stages.distill.train import Trainer  # noqa: E402
from store import FeatureStore  # noqa: E402

MODES = ("plain", "replay", "mismatch")


def add_views(canonical: Path, store_path: Path, views: int, dim: int) -> None:
    """<TEACHER>/image_view (random unit rows) and image_view_box (real boxes) for every training image."""
    ds = CanonicalDataset.load(canonical)
    rng = np.random.default_rng(1)
    train = np.zeros(ds.num_images, bool)
    train[ds.image_ids("train")] = True
    with FeatureStore.create_or_open(store_path, dataset_fingerprint=ds.fingerprint, n_images=ds.num_images,
                                     n_captions=ds.num_captions, rows_per_shard=4096, rows_per_chunk=256) as store:
        if (TEACHER, "image_view_box") in store.arrays():
            return
        store.ensure_array(TEACHER, "image_view", views * dim, provenance={"teacher": {"name": "random"}},
                           views=views)
        store.ensure_array(TEACHER, "image_view_box", 4 * views, dtype="float32",
                           provenance={"teacher": {"name": "random"}}, views=views, normalisation="none")
        for shard in store.pending_shards(TEACHER, "image_view"):
            start, stop = store.shard_rows(TEACHER, "image_view", shard)
            rows = rng.standard_normal((stop - start, views, dim)).astype(np.float32)
            rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
            boxes = np.zeros((stop - start, 4 * views), np.float32)
            for row in range(start, stop):
                if train[row]:
                    image = load_rgb(ds.image_source(row))
                    boxes[row - start] = draw_boxes(0, row, views, image.width, image.height, 0.4).reshape(-1)
            skipped = {row: "views are made for training images only" for row in range(start, stop) if not train[row]}
            store.write_shard(TEACHER, "image_view_box", shard, boxes, skipped=skipped)
            store.write_shard(TEACHER, "image_view", shard, rows.reshape(stop - start, -1), skipped=skipped)


def data_path_seconds(base, trainer: Trainer, batches: int) -> dict[str, float]:
    """Median seconds per batch of items + collate for each mode, alternating the modes batch by batch."""
    ds = trainer.data.ds
    tokenize = Tokenize(trainer.student.tokenizer, base.student.max_text_len)
    transform = trainer.student.image_transform(train=True)
    parts = {}
    for mode in MODES:
        cfg = dataclasses.replace(base)
        cfg.distill = dataclasses.replace(base.distill, views=mode)
        method = method_for(cfg, ds, in_memory=False)
        pairs = method.train_pairs(*method.valid())
        parts[mode] = (PairRows(ds, pairs, transform, views=method.view_plan(0)), method.collate(tokenize, 0))
    size = base.distill.batch_size
    order = np.random.default_rng(0).permutation(len(parts["plain"][0]))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for b in range(batches):
        chosen = order[(b * size) % (len(order) - size) :][:size]
        for mode in MODES[b % len(MODES):] + MODES[: b % len(MODES)]:  # each mode first in turn
            rows, collate = parts[mode]
            started = time.perf_counter()
            collate([rows[int(i)] for i in chosen])
            times[mode].append(time.perf_counter() - started)
    return {mode: float(np.median(values)) for mode, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--views", type=int, default=8, help="K stored views per training image")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per mode and round")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of plain / replay / mismatch")
    parser.add_argument("--data-batches", type=int, default=60, help="batches per mode for the data path alone")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: 2 on CPU, 12 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--max-text-len", type=int, default=32)
    parser.add_argument("--work", type=Path, help="where the generated data go (kept and reused); default: a temp dir")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = 12 if args.device == "cuda" else 2
    sizes = dict(PRESETS[args.preset])

    with tempfile.TemporaryDirectory(prefix="views-bench-") as scratch:
        root = (args.work or Path(scratch)) / args.preset
        root.mkdir(parents=True, exist_ok=True)
        n_train = math.ceil((args.warmup + 1 + args.steps) * sizes["batch"] / CAPTIONS_PER_IMAGE) + 1
        canonical, store_path = build_world(root, n_train, sizes["image_size"], sizes["dim"])
        add_views(canonical, store_path, args.views, sizes["dim"])
        base = make_config(args, sizes, canonical, store_path, root / "runs")
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        device = None
        for repeat in range(args.repeats):
            for mode in MODES:
                cfg = dataclasses.replace(base)
                cfg.distill = dataclasses.replace(base.distill, views=mode,
                                                  out_dir=str(root / "runs" / f"{mode}-{repeat}"))
                torch.manual_seed(0)
                trainer = Trainer(cfg, resume="no")
                device = trainer.device
                rates[mode].append(full_step_rate(trainer, args.warmup)[0])
        cfg = dataclasses.replace(base)
        cfg.distill = dataclasses.replace(base.distill, out_dir=str(root / "runs" / "parts"))
        torch.manual_seed(0)
        trainer = Trainer(cfg, resume="no")
        data = data_path_seconds(base, trainer, args.data_batches)
        bare = sizes["batch"] / bare_step_rate(trainer, args.steps, args.warmup)
    median = {mode: float(np.median(values)) for mode, values in rates.items()}
    best = {mode: float(np.max(values)) for mode, values in rates.items()}
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "views": args.views,
        "batch": sizes["batch"],
        "loader_workers": args.workers,
        "rounds": args.repeats,
        "all_pairs_per_s": {mode: [round(v, 2) for v in values] for mode, values in rates.items()},
        "data_ms_per_batch": {mode: round(1000 * value, 3) for mode, value in data.items()},
        "bare_step_ms": round(1000 * bare, 3),
        "data_replay_over_plain": round(data["replay"] / data["plain"], 3),
        "data_mismatch_over_plain": round(data["mismatch"] / data["plain"], 3),
        "inprocess_step_replay_over_plain": round((bare + data["replay"]) / (bare + data["plain"]), 3),
        "inprocess_step_mismatch_over_plain": round((bare + data["mismatch"]) / (bare + data["plain"]), 3),
    }
    for name, figures in (("median", median), ("best", best)):
        result[name] = {
            "pairs_per_s": {mode: round(value, 2) for mode, value in figures.items()},
            # Step time over plain's step time (the inverse of the rate ratio).
            "replay_step_time_over_plain": round(figures["plain"] / figures["replay"], 3),
            "mismatch_step_time_over_plain": round(figures["plain"] / figures["mismatch"], 3),
        }
        print(f"{args.preset} on {result['device']}, K = {args.views}, batch {sizes['batch']}, {args.workers} "
              f"loader workers, {name} of {args.repeats} rounds: plain {figures['plain']:.1f}, replay "
              f"{figures['replay']:.1f}, mismatch {figures['mismatch']:.1f} pairs/s; step time replay / plain "
              f"{result[name]['replay_step_time_over_plain']:.3f}, mismatch / plain "
              f"{result[name]['mismatch_step_time_over_plain']:.3f}", flush=True)
    print(f"data path alone, median of {args.data_batches} alternating batches: plain {1000 * data['plain']:.1f}, "
          f"replay {1000 * data['replay']:.1f}, mismatch {1000 * data['mismatch']:.1f} ms per batch (replay / plain "
          f"{result['data_replay_over_plain']:.3f}); bare model step {1000 * bare:.1f} ms; in-process step estimate "
          f"replay / plain {result['inprocess_step_replay_over_plain']:.3f}, mismatch / plain "
          f"{result['inprocess_step_mismatch_over_plain']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
