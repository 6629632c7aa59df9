"""Feature store throughput: writes (rows/s, MB/s) and random-batch reads, zarr and HDF5 against a numpy memmap.

    python benchmarks/store_throughput.py --rows 200000

For each dimension the same L2-normalised float32 rows are written three ways: our zarr store and our HDF5
store (whole shards through FeatureStore.write_shard: checks, cast, write, fsync, checksum, mark) and a plain
float16 numpy memmap (cast, write, fsync). Reads then draw the same random batches of ids from a warm page
cache. Two baselines, so that each of our read paths is compared with a memmap doing the same work:
"memmap fp16" gathers the stored float16 rows; "memmap -> fp32" also converts them to float32, which is what
reader.get returns by default. reader.get(..., dtype=None) returns the stored float16 and is compared with
"memmap fp16". Ratios are ours / memmap (higher is better; >= 0.5 is the goal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store import FeatureStore, open_store  # noqa: E402
from store.testing import unit_rows  # noqa: E402


def write_store(path: Path, values: np.ndarray, rows_per_shard: int, rows_per_chunk: int) -> float:
    started = time.perf_counter()
    with FeatureStore.create_or_open(path, dataset_fingerprint="0" * 64, n_images=len(values), n_captions=1,
                                     rows_per_shard=rows_per_shard, rows_per_chunk=rows_per_chunk) as store:
        store.ensure_array("bench", "image", values.shape[1], provenance={"benchmark": True})
        for shard in range(store.num_shards("image")):
            start, stop = store.shard_rows("bench", "image", shard)
            store.write_shard("bench", "image", shard, values[start:stop])
    return time.perf_counter() - started


def write_memmap(path: Path, values: np.ndarray, rows_per_shard: int) -> float:
    started = time.perf_counter()
    mapped = np.memmap(path, dtype=np.float16, mode="w+", shape=values.shape)
    for start in range(0, len(values), rows_per_shard):
        mapped[start : start + rows_per_shard] = values[start : start + rows_per_shard]
    mapped.flush()
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    del mapped
    return time.perf_counter() - started


def warm_page_cache(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


def time_reads(read, batches: list[np.ndarray], warmup: int, repeats: int = 3) -> float:
    """Best seconds per batch over `repeats` passes (after a warm-up that also maps the pages in)."""
    for ids in batches[:warmup]:
        read(ids)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for ids in batches:
            read(ids)
        best = min(best, (time.perf_counter() - started) / len(batches))
    return best


def run_dim(args, dim: int, workdir: Path) -> dict:
    print(f"\n## D = {dim}, {args.rows} rows, float16, batch {args.batch}", flush=True)
    values = unit_rows(args.rows, dim, seed=dim)
    stored_mb = args.rows * dim * 2 / 1e6
    paths = {"zarr": workdir / f"d{dim}.zarr", "hdf5": workdir / f"d{dim}.h5", "memmap": workdir / f"d{dim}.f16"}
    writes = {
        "zarr": write_store(paths["zarr"], values, args.rows_per_shard, args.rows_per_chunk),
        "hdf5": write_store(paths["hdf5"], values, args.rows_per_shard, args.rows_per_chunk),
        "memmap": write_memmap(paths["memmap"], values, args.rows_per_shard),
    }
    del values
    for path in paths.values():
        warm_page_cache(path)

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.batches)]
    mapped = np.memmap(paths["memmap"], dtype=np.float16, mode="r", shape=(args.rows, dim))
    # A reader checks each shard in full (crc32c against its mark) the first time it touches it: a one-time
    # cost, paid here by a batch that touches every shard.
    every_shard = np.arange(0, args.rows, args.rows_per_shard)
    first_touch = {}
    for name in ("zarr", "hdf5"):
        started = time.perf_counter()
        with open_store(paths[name]) as reader:
            reader.get("bench", "image", every_shard)
        first_touch[name] = time.perf_counter() - started
    print("open + first touch of every shard (checks): "
          + ", ".join(f"{name} {took:.3f}s ({stored_mb / took:,.0f} MB/s)" for name, took in first_touch.items()))
    zarr_reader, hdf5_reader = open_store(paths["zarr"]), open_store(paths["hdf5"])
    ram_reader = open_store(paths["zarr"], teacher="bench", kinds=("image",), in_memory=True)
    reads = {
        "memmap fp16": (lambda ids: mapped[ids], None),
        "memmap -> fp32": (lambda ids: mapped[ids].astype(np.float32), None),
        "zarr get fp32": (lambda ids: zarr_reader.get("bench", "image", ids), "memmap -> fp32"),
        "zarr get fp16": (lambda ids: zarr_reader.get("bench", "image", ids, dtype=None), "memmap fp16"),
        "hdf5 get fp32": (lambda ids: hdf5_reader.get("bench", "image", ids), "memmap -> fp32"),
        "hdf5 get fp16": (lambda ids: hdf5_reader.get("bench", "image", ids, dtype=None), "memmap fp16"),
        "in-RAM get fp32": (lambda ids: ram_reader.get("bench", "image", ids), "memmap -> fp32"),
    }
    seconds = {name: time_reads(read, batches, args.warmup) for name, (read, _) in reads.items()}
    stitched = zarr_reader._array("bench", "image")._stitched is not None
    print(f"zarr rows read through {'one stitched map of all shard files' if stitched else 'one map per shard'}")
    # zarr-python's own reader, for contrast: decoding chunk by chunk is what the memory-mapped path avoids.
    import zarr

    plain = zarr.open_array(str(paths["zarr"]), path="bench/image", mode="r")
    few = batches[: max(3, args.batches // 200)]
    seconds["zarr-python API (sorted ids)"] = time_reads(
        lambda ids: plain.get_orthogonal_selection((np.unique(ids), slice(None))), few, warmup=1, repeats=1
    )
    reads["zarr-python API (sorted ids)"] = (None, "memmap fp16")
    for reader in (zarr_reader, hdf5_reader, ram_reader):
        reader.close()

    print("\n| write | seconds | rows/s | MB/s (stored) |\n|---|---|---|---|")
    for name, took in writes.items():
        print(f"| {name} | {took:.2f} | {args.rows / took:,.0f} | {stored_mb / took:,.0f} |")
    print(f"\n| read (batch {args.batch}) | us/batch | batches/s | rows/s | ours / memmap |")
    print("|---|---|---|---|---|")
    for name, took in seconds.items():
        baseline = reads[name][1]
        ratio = f"{seconds[baseline] / took:.2f} (vs {baseline})" if baseline else "baseline"
        print(f"| {name} | {took * 1e6:,.0f} | {1 / took:,.0f} | {args.batch / took:,.0f} | {ratio} |")
    sizes = {name: sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
             for name, path in paths.items()}
    print("\nsize on disk: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()), flush=True)
    return {"dim": dim, "rows": args.rows, "write_seconds": writes, "read_seconds_per_batch": seconds, "bytes": sizes,
            "first_touch_seconds": first_touch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2000, help="timed random batches per read path")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--rows-per-chunk", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dsmd-store-bench-", dir=args.dir))
    print(f"# feature store throughput ({os.cpu_count()} CPUs, numpy {np.__version__}), files in {workdir}")
    try:
        results = [run_dim(args, dim, workdir) for dim in args.dims]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
