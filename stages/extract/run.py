"""`dsmd extract`: in-process, or fanned out over a dask.distributed cluster, each worker owning whole shards."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.config import Config
from pipeline.console import console, make_progress
from pipeline.errors import DsmdError
from stages.extract.worker import ExtractWorker, FillResult, fill_on_worker, prepare_on_worker


@dataclass
class ExtractSummary:
    teacher: str
    store: str
    rows_written: int = 0
    shards_written: int = 0
    shards_already_done: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 1


def _check_ready(cfg: Config) -> None:
    from pathlib import Path

    if not (Path(cfg.data.canonical_dir) / "dataset.json").exists():
        raise DsmdError(
            f"no canonical dataset in {cfg.data.canonical_dir}: run `dsmd data prepare` (and `dsmd data check`) first"
        )


def _summarise(summary: ExtractSummary, results: list[FillResult]) -> ExtractSummary:
    for result in results:
        summary.rows_written += result.rows
        summary.shards_written += len(result.shards)
        summary.skipped.update(result.skipped)
    return summary


def _print_summary(summary: ExtractSummary) -> None:
    rate = summary.rows_written / summary.seconds if summary.seconds else 0.0
    real_skips = {k: v for k, v in summary.skipped.items() if "split not selected" not in v}
    console.print(
        f"[green]extract done[/green]: teacher {summary.teacher} -> {summary.store}; "
        f"{summary.shards_written} shards written ({summary.shards_already_done} were already complete), "
        f"{summary.rows_written} rows in {summary.seconds:.1f}s ({rate:.1f} rows/s) on {summary.workers} worker(s); "
        f"{len(real_skips)} image(s) skipped"
    )
    for image_id, reason in sorted(real_skips.items())[:20]:
        console.print(f"  skipped image {image_id}: {reason}", highlight=False)
    if len(real_skips) > 20:
        console.print(f"  ... and {len(real_skips) - 20} more (see `dsmd store info`)")


def run_extract(cfg: Config) -> ExtractSummary:
    _check_ready(cfg)
    started = time.perf_counter()
    if cfg.extract.dask_workers > 0 or cfg.extract.dask_scheduler:
        summary = _run_dask(cfg)
    else:
        summary = _run_local(cfg)
    summary.seconds = time.perf_counter() - started
    _print_summary(summary)
    return summary


def _run_local(cfg: Config) -> ExtractSummary:
    worker = ExtractWorker(cfg)
    worker.prepare()
    total_shards = sum(worker.store.num_shards(cfg.teacher.name, kind) for kind in ("image", "text"))
    pending = worker.pending()
    summary = ExtractSummary(cfg.teacher.name, cfg.extract.store, shards_already_done=total_shards - len(pending))
    rows = sum(stop - start for stop, start in (_span(worker, kind, shard) for kind, shard in pending))
    with make_progress() as progress:
        task = progress.add_task(f"extract {cfg.teacher.name}", total=rows, rate="")

        def advance(n: int) -> None:
            speed = progress.tasks[task].speed
            progress.update(task, advance=n, rate=f"{speed:.1f} rows/s" if speed else "")

        result = worker.fill(pending, on_rows=advance)
    return _summarise(summary, [result])


def _span(worker: ExtractWorker, kind: str, shard: int) -> tuple[int, int]:
    start, stop = worker.store.shard_rows(worker.cfg.teacher.name, kind, shard)
    return stop, start


def _devices_for(n_workers: int, device: str) -> list[str]:
    """One GPU per worker when there are GPUs; otherwise every worker on the CPU."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(n_workers)]
    if device == "auto":
        return ["cpu"] * n_workers
    return [device] * n_workers


def _run_dask(cfg: Config) -> ExtractSummary:
    from dask.distributed import Client, LocalCluster, wait

    from pipeline.data.canonical import CanonicalDataset
    from stages.extract.worker import open_store

    ex = cfg.extract
    if ex.dask_scheduler:
        cluster = None
        client = Client(ex.dask_scheduler)
    else:
        # Processes, one thread each: every worker holds its own teacher and owns whole shards.
        cluster = LocalCluster(n_workers=ex.dask_workers, threads_per_worker=1, processes=True)
        client = Client(cluster)
    try:
        addresses = sorted(client.scheduler_info()["workers"])
        if not addresses:
            raise DsmdError(f"the Dask cluster at {ex.dask_scheduler or 'localhost'} has no workers")
        devices = _devices_for(len(addresses), ex.device)
        # Arrays are created once, before any worker writes (zarr must not be created from several processes).
        client.submit(prepare_on_worker, cfg, devices[0], workers=[addresses[0]], pure=False).result()
        ds = CanonicalDataset.load(cfg.data.canonical_dir)
        store = open_store(cfg, ds)
        name = cfg.teacher.name
        pending = [(kind, shard) for kind in ("image", "text") for shard in store.pending_shards(name, kind)]
        total = sum(store.num_shards(name, kind) for kind in ("image", "text"))
        summary = ExtractSummary(name, ex.store, shards_already_done=total - len(pending), workers=len(addresses))
        # Round robin: each worker gets every n-th pending shard, so image and text work is spread evenly.
        futures = []
        for index, address in enumerate(addresses):
            owned = pending[index :: len(addresses)]
            if owned:
                futures.append(
                    client.submit(fill_on_worker, cfg, owned, devices[index], workers=[address], pure=False)
                )
        with make_progress() as progress:
            task = progress.add_task(f"extract {name} on {len(addresses)} Dask workers", total=len(pending), rate="")
            while futures and not all(f.done() for f in futures):
                done = len(pending) - sum(len(store.pending_shards(name, kind)) for kind in ("image", "text"))
                progress.update(task, completed=done, rate="shards")
                time.sleep(1.0)
            progress.update(task, completed=len(pending))
        wait(futures)
        errors = [f.exception() for f in futures if f.status == "error"]
        if errors:
            raise DsmdError(f"a Dask worker failed: {errors[0]}; finished shards are kept, rerun to resume")
        return _summarise(summary, [f.result() for f in futures])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
