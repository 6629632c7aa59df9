"""distill.order blocks against shuffle with the store on a local S3 server and a bounded shard cache, and
blocks with the next window's shards prefetched in the background (WindowPrefetch) against blocks without.

    python benchmarks/shard_order.py --rows 16384 --cache-shards 24

The same store as benchmarks/store_s3.py (L2-normalised rows, 5 captions per image, written to a moto S3 server
running as its own process) is read as a training epoch reads it: per step, the teacher's image and text rows of
one batch of pairs, in the order distill.order gives (stages.distill.order through the real EpochBatches). The
shard cache (extract.cache_gb) holds --cache-shards shards, much less than the store, as at billion-pair scale
where no machine caches the store. Each step also "trains" for --step-ms (a sleep), the time in which a
background download can proceed; it is not part of the wait. Figures, side by side in one run:

- data wait per step (mean, p95 and max: the first step of a window touches every shard of it), timed;
  "shuffle" is timed on its first --shuffle-steps steps only, because every step refetches most of the store,
  and its mean stands for the epoch;
- shard downloads and bytes per epoch, counted by replaying the epoch's order through a least-recently-used
  cache of the same capacity (the ShardCache rule), not timed;
- for blocks and blocks_prefetch: the downloads the epoch really made, counted at the s3fs call, and how many
  of them a step made itself (foreground) rather than the prefetch threads.

Prefetch needs the cache to hold two windows (the one read and the next: 2 x window x 6 shards here), hence the
default of 24 shards; with less it fetches what fits and the rest is downloaded on demand as before.

--link-ms makes every download that much slower (a sleep in the download call) to see a slower link; the
sleeps of parallel prefetch threads overlap fully, where a real link would share its bandwidth among them.

The server is on loopback: a download of a 3 MB shard takes milliseconds, and what blocks without prefetch waits
per step is that time at each window's start. On a real network each download adds its latency and its
transfer time at the link's bandwidth (a 3 MB shard at 100 MB/s: 30 ms, plus tens of ms of first-byte latency
per request), so the foreground waits of blocks without prefetch grow with them, while the prefetch hides them
as long as a window's shards download within the window's steps (here 80 steps per window); the counted
downloads are what scales to a real network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_s3 import bench_bucket, report, summary, write  # noqa: E402

from stages.distill.data import EpochBatches, WindowPrefetch  # noqa: E402
from stages.distill.order import image_blocks  # noqa: E402
from store import open_store  # noqa: E402
from store.testing import unit_rows  # noqa: E402

CAPTIONS_PER_IMAGE = 5


def epoch_sampler(n_images: int, batch: int, order: str, rows_per_shard: int, window: int,
                  on_window=None) -> EpochBatches:
    """Epoch 0's sampler over the pairs (caption c belongs to image c // 5, as the canonical dataset orders them)."""
    pairs = np.arange(n_images * CAPTIONS_PER_IMAGE)
    blocks = image_blocks(pairs // CAPTIONS_PER_IMAGE, rows_per_shard) if order == "blocks" else None
    return EpochBatches(len(pairs), batch, seed=0, epoch=0, blocks=blocks, window=window, on_window=on_window)


def epoch_batches(n_images: int, batch: int, order: str, rows_per_shard: int, window: int) -> list[np.ndarray]:
    """Caption ids per step of epoch 0."""
    return [np.asarray(b) for b in epoch_sampler(n_images, batch, order, rows_per_shard, window)]


def batch_rows(captions: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """The rows a batch of pairs reads, as the distill method's prefetch_rows gives them."""
    return [("bench", "image", captions // CAPTIONS_PER_IMAGE), ("bench", "text", captions)]


class CountedDownloads:
    """Counts the reader's shard downloads at the s3fs call (they still go to the server), by thread, each made
    `link_s` slower (a sleep, as a slower link would take; see --link-ms)."""

    def __init__(self, reader, link_s: float = 0.0) -> None:
        self.fs = reader._backend.fs
        self.real = self.fs.get_file
        self.link_s = link_s
        self.foreground = self.background = 0
        self.fs.get_file = self

    def __call__(self, *args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self.foreground += 1
        else:
            self.background += 1
        time.sleep(self.link_s)
        return self.real(*args, **kwargs)


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


def timed_steps(reader, batches, step_s: float) -> list[float]:
    waits = []
    for captions in batches:
        captions = np.sort(np.asarray(captions))
        began = time.perf_counter()
        reader.get("bench", "image", captions // CAPTIONS_PER_IMAGE)
        reader.get("bench", "text", captions)
        waits.append(time.perf_counter() - began)
        time.sleep(step_s)
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384, help="images (captions: 5 per image)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows-per-shard", type=int, default=2048)
    parser.add_argument("--window", type=int, default=2, help="distill.order_window")
    parser.add_argument("--cache-shards", type=int, default=24, help="shard cache capacity, in shards")
    parser.add_argument("--step-ms", type=float, default=10.0, help="compute time of a step, not counted as wait")
    parser.add_argument("--link-ms", type=float, default=0.0,
                        help="added to every shard download, e.g. 60 for a 3 MB shard at 100 MB/s plus 30 ms latency")
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
        cache_bytes = args.cache_shards * shard_bytes + shard_bytes // 2
        step_s = args.step_ms / 1e3
        result.update(step_ms=args.step_ms, link_ms=args.link_ms)
        steps_per_window = args.window * args.rows_per_shard * CAPTIONS_PER_IMAGE // args.batch
        with tempfile.TemporaryDirectory(prefix="shard-order-") as tmp:
            for variant in ("blocks", "blocks_prefetch", "shuffle"):
                order = variant.split("_")[0]
                batches = epoch_batches(args.rows, args.batch, order, args.rows_per_shard, args.window)
                downloads = counted_downloads(batches, args.rows_per_shard, args.cache_shards)
                with open_store(url, cache_dir=Path(tmp) / variant, cache_bytes=cache_bytes) as reader:
                    counted = CountedDownloads(reader, args.link_ms / 1e3)
                    if variant == "blocks_prefetch":
                        prefetch = WindowPrefetch(reader, np.arange(args.rows * CAPTIONS_PER_IMAGE), batch_rows)
                        timed = epoch_sampler(args.rows, args.batch, order, args.rows_per_shard, args.window,
                                              prefetch)
                    else:
                        timed = batches if order == "blocks" else batches[: args.shuffle_steps]
                    waits = timed_steps(reader, timed, step_s)
                result[variant] = {"steps_per_epoch": len(batches), "timed_steps": len(waits), **summary(waits),
                                   "max_ms": round(max(waits) * 1e3, 3),
                                   "downloads_per_epoch": downloads,
                                   "GB_per_epoch": round(downloads * shard_bytes / 1e9, 2)}
                if order == "blocks":
                    # After the first window, whose shards nothing could have fetched ahead.
                    later = waits[steps_per_window:] or [0.0]
                    result[variant].update(max_ms_later_windows=round(max(later) * 1e3, 3),
                                           mean_ms_later_windows=round(float(np.mean(later)) * 1e3, 3),
                                           downloads_made=counted.foreground + counted.background,
                                           downloads_by_steps=counted.foreground)
        result["shuffle_over_blocks_wait"] = round(result["shuffle"]["mean_ms"] / result["blocks"]["mean_ms"], 1)
        result["shuffle_over_blocks_downloads"] = round(
            result["shuffle"]["downloads_per_epoch"] / result["blocks"]["downloads_per_epoch"], 1)
        for figure in ("mean_ms", "p95_ms"):
            result[f"blocks_over_prefetch_{figure.split('_')[0]}_wait"] = round(
                result["blocks"][figure] / max(result["blocks_prefetch"][figure], 1e-3), 1)
    report(result, args.out)


if __name__ == "__main__":
    main()
