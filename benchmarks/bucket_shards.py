"""WebDataset shards read from an S3 bucket against the same shards on local disk, side by side in one run.

    python benchmarks/bucket_shards.py --images 20000

Writes img2dataset-like shards (benchmarks/webdataset_scale.py's generator: small JPEGs, one caption each),
uploads them to a moto S3 server running as its own process on this machine (benchmarks/store_s3.py), then
times, side by side: `dsmd data prepare` from disk and from the bucket (which downloads each shard once to index
it), and `dsmd data check` (every image decoded) three ways: from disk; from the bucket through the local shard
cache, as the CLI runs it (each shard downloaded once, whole); from the bucket with one ranged GET per image (how
distill reads shards that neither come in order nor fit the cache). Reported: seconds and rows/s of each, and
each bucket time as a multiple of disk's.

The server is on loopback: every GET costs this machine's CPU for both ends (moto is Python) but no network
latency. Against a real bucket each ranged GET adds its round trip (10-50 ms), which the check hides only by
running more decoding threads (`dsmd data check --workers`); training reads images the same way, through its
loader workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_s3 import bench_bucket  # noqa: E402
from webdataset_scale import write_webdataset  # noqa: E402


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--per-shard", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=8, help="check's decoding threads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from pipeline.config import DataConfig
    from pipeline.console import console
    from pipeline.data.bucket import local_shard_cache
    from pipeline.data.canonical import prepare
    from pipeline.data.check import check_dataset
    from pipeline.data.scan import CanonicalScan

    console.quiet = True
    results = {}
    with tempfile.TemporaryDirectory(prefix="bucket-shards-") as tmp, bench_bucket():
        import s3fs

        root = Path(tmp)
        write_webdataset(root / "wds", args.images, args.per_shard, 48)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        files = sorted((root / "wds").iterdir())
        upload, _ = timed(lambda: [fs.put_file(str(p), f"bench/wds/{p.name}") for p in files])
        local = DataConfig(source=str(root / "wds"), images_root=str(root / "wds"), name="bench",
                           canonical_dir=str(root / "canonical-disk"), hash_split_val=0.05, hash_split_test=0.05)
        remote = replace(local, source="s3://bench/wds", images_root="s3://bench/wds",
                         canonical_dir=str(root / "canonical-bucket"))
        cache = local_shard_cache(str(root / "shard-cache"), 8.0)
        for name, cfg in (("disk", local), ("bucket", remote)):
            seconds, directory = timed(lambda cfg=cfg: prepare(cfg))
            results[name] = {"prepare_s": seconds, "prepare_rows_per_s": args.images / seconds,
                             "fingerprint": CanonicalScan(directory).fingerprint}
            for reads in (("cached", "ranged") if name == "bucket" else ("in place",)):
                scan = CanonicalScan(directory)
                if reads == "cached":
                    scan.use_shard_cache(cache)
                check_seconds, report = timed(lambda scan=scan: check_dataset(scan, workers=args.workers,
                                                                              progress=False))
                assert not report.bad_images
                results[name][f"check {reads}"] = {"s": check_seconds, "rows_per_s": args.images / check_seconds}
    assert results["disk"]["fingerprint"] == results["bucket"]["fingerprint"]
    disk_check = results["disk"]["check in place"]["s"]
    summary = {"images": args.images, "shards": -(-args.images // args.per_shard), "upload_s": upload, **results,
               "bucket_over_disk": {"prepare": results["bucket"]["prepare_s"] / results["disk"]["prepare_s"],
                                    "check cached": results["bucket"]["check cached"]["s"] / disk_check,
                                    "check ranged": results["bucket"]["check ranged"]["s"] / disk_check}}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
