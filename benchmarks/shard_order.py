"""distill.order blocks against shuffle with the store on a local S3 server and a bounded shard cache.

    python benchmarks/shard_order.py --rows 16384 --cache-shards 8

The same store as benchmarks/store_s3.py (L2-normalised rows, 5 captions per image, written to a moto S3 server
running as its own process) is read as a training epoch reads it: per step, the teacher's image and text rows of
one batch of pairs, in the order distill.order gives (stages.distill.order through the real EpochBatches). The
shard cache (extract.cache_gb) holds --cache-shards shards, much less than the store, as at billion-pair scale
where no machine caches the store. Two figures per order, side by side in one run:

- data wait per step (mean and p95), timed; "shuffle" is timed on its first --shuffle-steps steps only,
  because every step refetches most of the store, and its mean stands for the epoch;
- shard downloads and bytes per epoch, counted by replaying the epoch's order through a least-recently-used
  cache of the same capacity (the ShardCache rule), not timed.

The server is on loopback, so a remote bucket adds its latency to every download: the counted downloads are
what scales to a real network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_s3 import bench_bucket, report, summary, write  # noqa: E402

from stages.distill.data import EpochBatches  # noqa: E402
from stages.distill.order import image_blocks  # noqa: E402
from store import open_store  # noqa: E402
from store.testing import unit_rows  # noqa: E402

CAPTIONS_PER_IMAGE = 5


def epoch_batches(n_images: int, batch: int, order: str, rows_per_shard: int, window: int) -> list[np.ndarray]:
    """Caption ids per step of epoch 0 (caption c belongs to image c // 5, as the canonical dataset orders them)."""
    pairs = np.arange(n_images * CAPTIONS_PER_IMAGE)
    blocks = image_blocks(pairs // CAPTIONS_PER_IMAGE, rows_per_shard) if order == "blocks" else None
    sampler = EpochBatches(len(pairs), batch, seed=0, epoch=0, blocks=blocks, window=window)
    return [pairs[np.asarray(b)] for b in sampler]


def counted_downloads(batches: list[np.ndarray], rows_per_shard: int, capacity: int) -> int:
    """Shard downloads of the epoch through an LRU cache of ``capacity`` shards (image and text shards alike)."""
    cache: OrderedDict = OrderedDict()
    downloads = 0
    for captions in batches:
        needed = [("image", s) for s in np.unique(captions // CAPTIONS_PER_IMAGE // rows_per_shard)]
        needed += [("text", s) for s in np.unique(captions // rows_per_shard)]
        for shard in needed:
            if shard in cache:
                cache.move_to_end(shard)
                continue
            downloads += 1
            cache[shard] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return downloads


def timed_steps(reader, batches: list[np.ndarray]) -> list[float]:
    waits = []
    for captions in batches:
        captions = np.sort(captions)
        began = time.perf_counter()
        reader.get("bench", "image", captions // CAPTIONS_PER_IMAGE)
        reader.get("bench", "text", captions)
        waits.append(time.perf_counter() - began)
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384, help="images (captions: 5 per image)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=2048)
    parser.add_argument("--window", type=int, default=2, help="distill.order_window")
    parser.add_argument("--cache-shards", type=int, default=16, help="shard cache capacity, in shards")
    parser.add_argument("--shuffle-steps", type=int, default=30, help="steps timed for the full shuffle")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    shard_bytes = args.rows_per_shard * args.dim * 2  # float16 rows
    with bench_bucket():
        images = unit_rows(args.rows, args.dim, seed=0)
        texts = unit_rows(args.rows * CAPTIONS_PER_IMAGE, args.dim, seed=1)
        url = "s3://bench/features.zarr"
        write(url, images, texts, args.rows_per_shard)
        n_shards = -(-args.rows // args.rows_per_shard) * (1 + CAPTIONS_PER_IMAGE)
        result: dict = {"images": args.rows, "captions": args.rows * CAPTIONS_PER_IMAGE, "dim": args.dim,
                        "batch": args.batch, "rows_per_shard": args.rows_per_shard, "window": args.window,
                        "store_shards": n_shards, "cache_shards": args.cache_shards,
                        "shard_MB": round(shard_bytes / 1e6, 2), "endpoint": "moto on loopback"}
        with tempfile.TemporaryDirectory(prefix="shard-order-") as tmp:
            for order in ("blocks", "shuffle"):
                batches = epoch_batches(args.rows, args.batch, order, args.rows_per_shard, args.window)
                downloads = counted_downloads(batches, args.rows_per_shard, args.cache_shards)
                timed = batches if order == "blocks" else batches[: args.shuffle_steps]
                with open_store(url, cache_dir=Path(tmp) / order,
                                cache_bytes=args.cache_shards * shard_bytes + shard_bytes // 2) as reader:
                    waits = timed_steps(reader, timed)
                result[order] = {"steps_per_epoch": len(batches), "timed_steps": len(timed), **summary(waits),
                                 "downloads_per_epoch": downloads,
                                 "GB_per_epoch": round(downloads * shard_bytes / 1e9, 2)}
        result["shuffle_over_blocks_wait"] = round(result["shuffle"]["mean_ms"] / result["blocks"]["mean_ms"], 1)
        result["shuffle_over_blocks_downloads"] = round(
            result["shuffle"]["downloads_per_epoch"] / result["blocks"]["downloads_per_epoch"], 1)
    report(result, args.out)


if __name__ == "__main__":
    main()
