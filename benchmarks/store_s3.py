"""Feature store on a local S3 server against the same store on local disk, side by side in one run.

    python benchmarks/store_s3.py --rows 65536 --dim 768 --batch 256

A moto S3 server runs as a separate process on this machine (so its request handling does not share this
process's interpreter lock), and the same L2-normalised rows are written to a local zarr store and to
s3://bench/features.zarr. Then, for each store:

- write: FeatureStore.write_shard over every shard (S3: one PUT per shard, read back and hashed, then the mark).
- batch reads: reader.get on the same random batches of ids. For S3 three ways: "cold" (an empty shard cache:
  each shard is downloaded the first time a batch touches it), "warm" (every shard already cached) and
  "bounded" (a cache holding a quarter of the store, so shards are evicted and fetched again).
- data wait per training step: one epoch of shuffled (image, caption) id batches, each fetching the teacher's
  image and text rows as the distill loader's collate does (reader.get per kind); the mean and p95 time per
  step are what a training step waits for teacher rows when the loader cannot run ahead. The image decoding
  and tokenising that the loader also does are the same for both stores and left out.

Ratios are S3 / local (times: higher means slower). The server is on loopback, so this measures the store's own
overhead (HTTP, s3fs, the cache) rather than a network; a remote bucket adds its latency to every cold fetch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import FeatureStore, open_store  # noqa: E402
from store.testing import unit_rows  # noqa: E402


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the moto server did not start within 60 s")


@contextlib.contextmanager
def bench_bucket() -> Iterator[None]:
    """A moto server in its own process with the bucket "bench", the AWS_* variables pointing at it."""
    server, endpoint = start_server()
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
        yield
    finally:
        server.terminate()
        server.wait()


def report(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


def write(path: str, values: np.ndarray, texts: np.ndarray, rows_per_shard: int) -> float:
    started = time.perf_counter()
    with FeatureStore.create_or_open(path, dataset_fingerprint="0" * 64, n_images=len(values),
                                     n_captions=len(texts), rows_per_shard=rows_per_shard,
                                     rows_per_chunk=min(256, rows_per_shard)) as store:
        for kind, rows in (("image", values), ("text", texts)):
            store.ensure_array("bench", kind, values.shape[1], provenance={"benchmark": True})
            for shard in range(store.num_shards(kind)):
                start, stop = store.shard_rows("bench", kind, shard)
                store.write_shard("bench", kind, shard, rows[start:stop])
    return time.perf_counter() - started


def batch_reads(reader, batches: list[np.ndarray]) -> float:
    started = time.perf_counter()
    for ids in batches:
        reader.get("bench", "image", ids)
    return time.perf_counter() - started


def data_wait(reader, n_images: int, batch: int, seed: int) -> list[float]:
    """Per step: teacher image rows and caption rows of one shuffled batch (5 captions per image)."""
    rng = np.random.default_rng(seed)
    captions = rng.permutation(n_images * 5)
    waits = []
    for start in range(0, len(captions) - batch + 1, batch):
        caption_ids = np.sort(captions[start : start + batch])
        began = time.perf_counter()
        reader.get("bench", "image", caption_ids // 5)
        reader.get("bench", "text", caption_ids)
        waits.append(time.perf_counter() - began)
    return waits


def summary(waits: list[float]) -> dict:
    ms = np.array(waits) * 1e3
    return {"mean_ms": round(float(ms.mean()), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "steps": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384, help="images (captions: 5 per image)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100, help="random batches for the batch-read figures")
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    with bench_bucket():
        images = unit_rows(args.rows, args.dim, seed=0)
        texts = unit_rows(args.rows * 5, args.dim, seed=1)
        url = "s3://bench/features.zarr"
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.batches)]
        with tempfile.TemporaryDirectory(prefix="store-s3-") as tmp:
            local = str(Path(tmp) / "features.zarr")
            result: dict = {"rows": args.rows, "captions": args.rows * 5, "dim": args.dim, "batch": args.batch,
                            "rows_per_shard": args.rows_per_shard, "endpoint": "moto on loopback"}
            t_local = write(local, images, texts, args.rows_per_shard)
            t_s3 = write(url, images, texts, args.rows_per_shard)
            nbytes = (images.size + texts.size) * 2
            result["write_MBps"] = {"local": round(nbytes / t_local / 1e6, 1), "s3": round(nbytes / t_s3 / 1e6, 1),
                                    "s3_over_local_time": round(t_s3 / t_local, 2)}

            rows_read = args.batch * args.batches
            with open_store(local) as reader:
                batch_reads(reader, batches[:5])  # maps and first-touch checks out of the timing
                t_local = batch_reads(reader, batches)
            cache = Path(tmp) / "cache"
            with open_store(url, cache_dir=cache) as reader:
                t_cold = batch_reads(reader, batches)
                t_warm = batch_reads(reader, batches)
            store_bytes = nbytes
            with open_store(url, cache_dir=Path(tmp) / "small", cache_bytes=store_bytes // 4) as reader:
                t_bounded = batch_reads(reader, batches)
            result["batch_reads_rows_per_s"] = {
                "local": round(rows_read / t_local), "s3_cold": round(rows_read / t_cold),
                "s3_warm": round(rows_read / t_warm), "s3_bounded_quarter": round(rows_read / t_bounded),
                "s3_warm_over_local_time": round(t_warm / t_local, 2),
                "s3_cold_over_local_time": round(t_cold / t_local, 2),
            }

            with open_store(local) as reader:
                data_wait(reader, args.rows, args.batch, seed=1)  # warm-up pass
                local_wait = data_wait(reader, args.rows, args.batch, seed=2)
            with open_store(url, cache_dir=Path(tmp) / "epoch") as reader:
                cold_wait = data_wait(reader, args.rows, args.batch, seed=2)  # first epoch: cache empty
                warm_wait = data_wait(reader, args.rows, args.batch, seed=3)  # later epochs
            result["data_wait_per_step"] = {
                "local": summary(local_wait), "s3_first_epoch": summary(cold_wait),
                "s3_later_epochs": summary(warm_wait),
                "s3_later_over_local": round(float(np.mean(warm_wait) / np.mean(local_wait)), 2),
                "s3_first_over_local": round(float(np.mean(cold_wait) / np.mean(local_wait)), 2),
            }
    report(result, args.out)


if __name__ == "__main__":
    main()
