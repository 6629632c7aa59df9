"""How `dsmd data prepare`, `dsmd data check` and `dsmd extract` scale on a WebDataset (img2dataset layout):
time per row should stay flat as the dataset grows (linear total time) and so should peak memory.

For each size N it writes N small JPEGs (48 px, one caption each, no split field: the hash split sends 5% to val
and 5% to test) into img2dataset-like shards (``00000.tar`` + ``00000.parquet``, --per-shard samples each) with
the webdataset package's TarWriter, then runs each phase in a fresh process, measuring from outside:
- seconds of the phase itself (inside the process, imports excluded) and rows/s (images for prepare and check;
  images + captions, i.e. the rows `dsmd extract` encodes, for extract);
- peak RSS of the phase's whole process tree (the process, its Dask nanny and worker processes, their loader
  processes), sampled every 50 ms with psutil. Summed RSS counts shared pages (the torch libraries) once per
  process, so it overstates the memory really in use; what matters here is whether it grows with N.
The teacher is the tiny BEiT-3 fixture (../shared/fixtures/beit3-tiny, 32 px) on the CPU, one torch thread per
process: the work is dominated by reading and decoding, which is what this benchmark is about.

    nice -n 19 python benchmarks/webdataset_scale.py                          # 10k, 30k, 100k; 1 and 2 workers
    nice -n 19 python benchmarks/webdataset_scale.py --sizes 2000,6000 --out results.json
    nice -n 19 python benchmarks/webdataset_scale.py --workers 0                   # prepare and check only
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "beit3-tiny"
DISTINCT_IMAGES = 512  # decoding cost does not depend on which image it is: reuse a pool of encoded JPEGs


def write_webdataset(out: Path, n: int, per_shard: int, image_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from webdataset import TarWriter

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(DISTINCT_IMAGES):
        pixels = rng.integers(0, 256, (image_size // 4, image_size // 4, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB").resize((image_size, image_size), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    out.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, n, per_shard)):
        rows = []
        with TarWriter(str(out / f"{shard:05d}.tar")) as writer:
            for i in range(start, min(start + per_shard, n)):
                key = f"{shard:05d}{i - start:04d}"
                caption = f"synthetic image number {i}"
                writer.write({"__key__": key, "jpg": pool[i % DISTINCT_IMAGES], "txt": caption,
                              "json": {"key": key, "caption": caption, "status": "success"}})
                rows.append({"key": key, "caption": caption, "status": "success", "error_message": None})
        pq.write_table(pa.Table.from_pylist(rows), out / f"{shard:05d}.parquet")


def _config(root: Path, workers: int, loader_workers: int, rows_per_shard: int):
    from pipeline.config import Config, DataConfig, ExtractConfig, TeacherConfig

    data = DataConfig(source=str(root / "wds"), images_root=str(root / "wds"), canonical_dir=str(root / "canonical"),
                      name="wds-scale", hash_split_val=0.05, hash_split_test=0.05)
    teacher = TeacherConfig(name="beit3-tiny", checkpoint=str(FIXTURE / "checkpoint.pth"),
                            size=str(FIXTURE / "config.json"), tokenizer=str(FIXTURE / "tokenizer.spm"),
                            img_size=32, max_text_len=16)
    extract = ExtractConfig(store=str(root / f"features-{workers}.zarr"), device="cpu", precision="fp32",
                            cpu_threads=1, loader_workers=loader_workers, dask_workers=workers,
                            image_batch_size=256, text_batch_size=512, rows_per_shard=rows_per_shard)
    return Config(data=data, teacher=teacher, extract=extract, extra_teachers=[])


def run_phase(phase: str, root: Path, workers: int, loader_workers: int, rows_per_shard: int) -> dict:
    """One phase, in this process; returns its seconds and the rows it handled."""
    from pipeline.console import console

    console.quiet = True
    cfg = _config(root, workers, loader_workers, rows_per_shard)
    started = time.perf_counter()
    if phase == "prepare":  # what `dsmd data prepare` runs
        from pipeline.data.canonical import prepare
        from pipeline.data.scan import CanonicalScan

        rows = CanonicalScan(prepare(cfg.data)).num_images
    elif phase == "check":  # what `dsmd data check` runs
        from pipeline.data.check import check_dataset
        from pipeline.data.scan import CanonicalScan

        report = check_dataset(CanonicalScan(cfg.data.canonical_dir), workers=2, progress=False)
        assert not report.bad_images, report.bad_images[:3]
        rows = report.num_images
    else:
        from stages.extract.run import run_extract

        summary = run_extract(cfg)
        assert not summary.skipped, list(summary.skipped.items())[:3]
        seconds = time.perf_counter() - started
        # fill: the slowest worker's encoding time, without starting the cluster and loading the teacher.
        return {"seconds": seconds, "rows": summary.rows_encoded, "fill_seconds": summary.fill_seconds}
    return {"seconds": time.perf_counter() - started, "rows": rows}


def _tree_rss(process) -> int:
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measured(phase: str, root: Path, workers: int, loader_workers: int, rows_per_shard: int) -> dict:
    """Run one phase in a child process; its own timing plus the peak RSS of its process tree."""
    import psutil

    command = [sys.executable, __file__, "--phase", phase, "--root", str(root), "--workers", str(workers),
               "--loader-workers", str(loader_workers), "--rows-per-shard", str(rows_per_shard)]
    child = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, _tree_rss(child))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{phase} (workers={workers}) failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "rows_per_s": result["rows"] / result["seconds"], "peak_rss_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,30000,100000", help="comma-separated numbers of images")
    parser.add_argument("--workers", default="1,2", help="comma-separated Dask worker counts for extract; "
                        "0 = no extract (prepare and check only)")
    parser.add_argument("--loader-workers", type=int, default=0, help="decoding processes per extract worker")
    parser.add_argument("--per-shard", type=int, default=10000, help="samples per tar shard (img2dataset: 10k)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--rows-per-shard", type=int, default=1024,
                        help="store shard size, the unit of work a Dask worker takes")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--phase", choices=["prepare", "check", "extract"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.root, int(args.workers), args.loader_workers,
                                   args.rows_per_shard)))
        return
    if not FIXTURE.is_dir():
        raise SystemExit(f"{FIXTURE}: the tiny BEiT-3 fixture is needed (../shared/fixtures/beit3-tiny)")

    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"wds-scale-{n}-") as tmp:
            root = Path(tmp)
            started = time.perf_counter()
            write_webdataset(root / "wds", n, args.per_shard, args.image_size)
            print(f"N={n:,}: wrote {-(-n // args.per_shard)} shard(s) in {time.perf_counter() - started:.1f}s",
                  flush=True)
            phases = [("prepare", 0), ("check", 0), *[("extract", w) for w in workers if w > 0]]
            for phase, w in phases:
                result = {"n": n, "phase": phase, "workers": w,
                          **measured(phase, root, w, args.loader_workers, args.rows_per_shard)}
                results.append(result)
                label = f"extract x{w}" if phase == "extract" else phase
                fill = (f"  (encoding alone: {result['fill_seconds']:.1f}s, "
                        f"{result['rows'] / result['fill_seconds']:,.0f} rows/s)" if "fill_seconds" in result else "")
                print(f"  {label:<10} {result['seconds']:8.1f}s {result['rows_per_s']:10,.0f} rows/s  "
                      f"peak RSS {result['peak_rss_mib']:8,.0f} MiB{fill}", flush=True)
    _summarise(results, sizes)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


def _summarise(results: list[dict], sizes: list[int]) -> None:
    if len(sizes) < 2:
        return
    small, large = min(sizes), max(sizes)
    print(f"\nfrom N={small:,} to N={large:,} ({large / small:.1f}x the rows):")
    for key in sorted({(r["phase"], r["workers"]) for r in results}):
        a = next(r for r in results if (r["phase"], r["workers"], r["n"]) == (*key, small))
        b = next(r for r in results if (r["phase"], r["workers"], r["n"]) == (*key, large))
        # Time per row: of the encoding alone for extract (its fixed start-up would flatter the larger size).
        seconds = "fill_seconds" if "fill_seconds" in a else "seconds"
        per_row = (b[seconds] / b["rows"]) / (a[seconds] / a["rows"])
        memory = b["peak_rss_mib"] / a["peak_rss_mib"]
        label = f"extract x{key[1]}" if key[0] == "extract" else key[0]
        verdict = "linear" if per_row < 1.25 else "SUPERLINEAR"
        flat = "flat" if memory < 1.25 else "GROWS"
        print(f"  {label:<10} time per row x{per_row:.2f} ({verdict}); peak RSS x{memory:.2f} ({flat})")


if __name__ == "__main__":
    main()
