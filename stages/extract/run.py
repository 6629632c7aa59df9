"""`dsmd extract`: in-process, or fanned out over a dask.distributed cluster, each worker owning whole shards.

Torch is imported only where the teacher runs (the worker module), so the Dask client and the early checks
stay light.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from pipeline.config import Config, replace_settings
from pipeline.console import console, make_progress
from pipeline.data.canonical import CanonicalDataset
from pipeline.errors import DsmdError
from stages.extract.plan import (
    KINDS,
    UNSELECTED,
    ShardTask,
    check_splits,
    open_store,
    plan_shards,
    selected_count,
    selected_rows,
)
from stages.extract.tracked import check_tracked, record_store
from store import FeatureStore
from store.backends import delete_store, store_exists, writer_lease
from store.errors import StoreError, StoreMismatchError

if TYPE_CHECKING:
    from store.s3_lease import S3WriterLease

_LISTED = 20  # skipped images named in the summary; the rest are in `dsmd store info`


@dataclass
class ExtractSummary:
    teacher: str
    store: str
    shards_total: int = 0
    shards_written: int = 0
    # Complete shards rewritten because they held rows of a split selected only now (part of shards_written).
    shards_redone: int = 0
    shards_already_done: int = 0
    rows_encoded: int = 0
    rows_written: int = 0
    # Over the whole store once the run is done: image row -> reason (bad or missing files) ...
    skipped: dict[int, str] = field(default_factory=dict)
    # ... and per kind the rows left out because extract.splits did not select their split.
    unselected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # the whole run
    fill_seconds: float = 0.0  # encoding and writing shards (the slowest worker's), without loading
    workers: int = 1
    notes: list[str] = field(default_factory=list)
    replaced_store: bool = False  # --replace-stale deleted a store made for other settings first
    views: int = 0  # extract.views: K teacher views per training image
    view_seconds: float = 0.0  # this run's time on view shards (the slowest worker's)


def _check_ready(cfg: Config) -> None:
    if not (Path(cfg.data.canonical_dir) / "dataset.json").exists():
        raise DsmdError(
            f"no canonical dataset in {cfg.data.canonical_dir}: run `dsmd data prepare` (and `dsmd data check`) first"
        )
    check_splits(cfg.extract.splits)
    check_tracked(cfg)
    ex = cfg.extract
    if ex.dask_workers < 0:
        raise DsmdError(f"extract.dask_workers must be 0 (in-process) or more, got {ex.dask_workers}")
    if (ex.dask_workers > 0 or ex.dask_scheduler) and (ex.backend == "hdf5" or ex.store.endswith((".h5", ".hdf5"))):
        raise DsmdError(
            f"extract.store {ex.store}: an HDF5 store takes one writer, not a Dask cluster; extract into zarr and "
            "`dsmd store convert` it"
        )


def run_extract(cfg: Config, *, replace_stale: bool = False, repair: bool = False) -> ExtractSummary:
    """Fill the store, resuming a partial one. ``replace_stale``: a store at the path that was made for another
    dataset, layout or teacher setup is deleted and rebuilt (what DVC wants: the store is the stage's own
    output, kept only so that a killed run can resume); without it such a store is an error. ``repair``: first
    drop the shards of this teacher that `dsmd store verify` flags as damaged, so that exactly those are
    written again."""
    _check_ready(cfg)
    with writer_lease(cfg.extract.store, "dsmd extract") as lease:
        summary = _extract_one(cfg, replace_stale=replace_stale, repair=repair, lease=lease)
    record_store(cfg)
    return summary


def _extract_one(cfg: Config, *, replace_stale: bool, repair: bool, lease: S3WriterLease | None) -> ExtractSummary:
    started = time.perf_counter()
    run = _run_dask if cfg.extract.dask_workers > 0 or cfg.extract.dask_scheduler else _run_local
    try:
        repaired = _repair(cfg, lease) if repair else []
        summary = run(cfg, lease)
    except StoreMismatchError as exc:
        if not replace_stale:
            raise
        console.print(f"[yellow]{escape(str(exc))}[/yellow]")
        console.print(f"--replace-stale: deleting {cfg.extract.store} and starting over", highlight=False)
        if lease is not None:
            lease.check()
        delete_store(cfg.extract.store)  # refuses, by name, anything that is not a dsmd store
        repaired = []
        summary = run(cfg, lease)
        summary.replaced_store = True
    summary.notes = repaired + summary.notes
    summary.seconds = time.perf_counter() - started
    _print_summary(summary)
    return summary


def run_extract_all(cfg: Config, *, replace_stale: bool = False, repair: bool = False) -> list[ExtractSummary]:
    """`teacher`, then every extra_teachers entry, into the one store (each resumes on its own)."""
    teachers = [cfg.teacher, *cfg.extra_teachers]
    names = [t.name for t in teachers]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DsmdError(
            f"teacher name {repeated[0]!r} is used twice (teacher.name and extra_teachers[].name): each teacher "
            "needs its own name in the store"
        )
    _check_ready(cfg)
    with writer_lease(cfg.extract.store, "dsmd extract") as lease:  # one lease for all teachers
        summaries = _extract_all(cfg, teachers, replace_stale=replace_stale, repair=repair, lease=lease)
    record_store(cfg)
    return summaries


def _extract_all(cfg: Config, teachers: list, *, replace_stale: bool, repair: bool,
                 lease: S3WriterLease | None) -> list[ExtractSummary]:
    summaries: list[ExtractSummary] = []
    for teacher in teachers:
        summary = _extract_one(replace_settings(cfg, teacher=teacher), replace_stale=replace_stale, repair=repair,
                               lease=lease)
        if summary.replaced_store and summaries:
            # The rebuilt store lost the teachers extracted before this one: fill them again.
            console.print("the store was rebuilt: extracting the earlier teachers again", highlight=False)
            return _extract_all(cfg, teachers, replace_stale=False, repair=False, lease=lease)
        summaries.append(summary)
    return summaries


def _repair(cfg: Config, lease: S3WriterLease | None) -> list[str]:
    """Drop every shard of this teacher that `dsmd store verify` flags (marked complete, but damaged or unusable):
    the run then writes exactly those again. Returns notes for the summary."""
    from store.verify import verify_store

    path, name = cfg.extract.store, cfg.teacher.name
    if not store_exists(path):
        return []
    report = verify_store(path, teachers=[name])
    if report.store_problems and report.store_problems[0].endswith("no feature store metadata"):
        return []  # nothing made yet: the run creates the store
    if report.store_problems:
        raise DsmdError(
            f"{report.store_problems[0]}: --repair redoes damaged shards, but this is damage to the store itself; "
            f"delete {path} and rerun dsmd extract"
        )
    damaged = [d for d in report.damaged if d.marked]
    if not damaged:
        return [f"--repair: verify found no damaged shards of {name}"]
    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    with open_store(cfg, ds, lease) as store:
        for teacher, kind in sorted({(d.teacher, d.kind) for d in damaged}):
            store.drop_shards(teacher, kind, [d.shard for d in damaged if (d.teacher, d.kind) == (teacher, kind)])
    shown = ", ".join(f"{d.teacher}/{d.kind} shard {d.shard} ({d.file})" for d in damaged[:_LISTED])
    more = f" and {len(damaged) - _LISTED} more" if len(damaged) > _LISTED else ""
    notes = [f"--repair: redoing {len(damaged)} damaged shard(s): {shown}{more}"]
    if any(d.kind == "pair" for d in damaged):
        notes.append(f"--repair dropped damaged {name}/pair shards: run `dsmd extract-pairs` to write them again")
    return notes


def _start_summary(cfg: Config, store: FeatureStore, tasks: list[ShardTask], workers: int) -> ExtractSummary:
    kinds = KINDS + (("image_view",) if cfg.extract.views > 0 else ())
    total = sum(store.num_shards(kind) for kind in kinds)
    return ExtractSummary(
        cfg.teacher.name,
        cfg.extract.store,
        shards_total=total,
        shards_already_done=total - len(tasks),
        workers=workers,
        views=cfg.extract.views,
    )


def _finish(summary: ExtractSummary, store: FeatureStore, results) -> ExtractSummary:
    for result in results:
        summary.rows_encoded += result.rows_encoded
        summary.rows_written += result.rows_written
        summary.shards_written += len(result.shards)
        summary.shards_redone += sum(task.redo for task in result.shards)
        summary.fill_seconds = max(summary.fill_seconds, result.seconds)
        summary.view_seconds = max(summary.view_seconds, result.view_seconds)
        summary.notes += [note for note in result.notes if note not in summary.notes]
    for kind in KINDS:
        skipped = store.skipped(summary.teacher, kind)
        summary.unselected[kind] = sum(reason == UNSELECTED for reason in skipped.values())
        if kind == "image":
            summary.skipped = {row: reason for row, reason in skipped.items() if reason != UNSELECTED}
    return summary


def _print_summary(summary: ExtractSummary) -> None:
    rate = summary.rows_encoded / summary.fill_seconds if summary.fill_seconds else 0.0
    redone = f", {summary.shards_redone} of them for newly selected splits" if summary.shards_redone else ""
    console.print(
        f"[green]extract done[/green]: teacher {summary.teacher} -> {summary.store}; "
        f"{summary.shards_written} shards written{redone}, {summary.shards_already_done} were already complete "
        f"(of {summary.shards_total}); {summary.rows_encoded} rows encoded in {summary.fill_seconds:.1f}s "
        f"({rate:.1f} rows/s; {summary.seconds:.1f}s in all) on {summary.workers} worker(s); "
        f"{len(summary.skipped)} image(s) skipped",
        highlight=False,
    )
    for image_id, reason in list(summary.skipped.items())[:_LISTED]:
        console.print(f"  skipped image {image_id}: {reason}", highlight=False)
    if len(summary.skipped) > _LISTED:
        console.print(f"  ... and {len(summary.skipped) - _LISTED} more (see `dsmd store info`)")
    if any(summary.unselected.values()):
        console.print(
            f"  left out by extract.splits: {summary.unselected.get('image', 0)} image and "
            f"{summary.unselected.get('text', 0)} caption rows (invalid in the store; a run selecting their split "
            "adds them)",
            highlight=False,
        )
    if summary.views:
        console.print(
            f"  views: {summary.views} per training image; {summary.view_seconds:.1f}s of this run on view shards "
            "(`dsmd store info` shows their storage and total time)",
            highlight=False,
        )
    for note in summary.notes:
        console.print(f"  note: {note}", highlight=False)


def _run_local(cfg: Config, lease: S3WriterLease | None) -> ExtractSummary:
    import torch

    from stages.extract.worker import ExtractWorker, cpu_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(cfg.extract.cpu_threads, cfg.extract.loader_workers))
    try:
        with ExtractWorker(cfg, lease=lease) as worker:
            worker.prepare()
            tasks = worker.plan()
            summary = _start_summary(cfg, worker.store, tasks, workers=1)
            total = selected_count(worker.store, tasks, worker.selected)
            with make_progress() as progress:
                bar = progress.add_task(f"extract {cfg.teacher.name}", total=total, rate="")

                def advance(n: int) -> None:
                    speed = progress.tasks[bar].speed
                    progress.update(bar, advance=n, rate=f"{speed:.1f} rows/s" if speed else "")

                result = worker.fill(tasks, on_rows=advance)
            return _finish(summary, worker.store, [result])
    finally:
        torch.set_num_threads(previous)


# -- Dask ---------------------------------------------------------------------------------------------
def _connect(cfg: Config):
    """(client, cluster or None). A local cluster runs one single-threaded process per worker."""
    from dask.distributed import Client, LocalCluster

    ex = cfg.extract
    if ex.dask_scheduler:
        try:
            return Client(ex.dask_scheduler, timeout="30s"), None
        except (OSError, TimeoutError) as exc:
            raise DsmdError(
                f"extract.dask_scheduler {ex.dask_scheduler!r}: cannot connect ({exc}); is the scheduler running "
                "and reachable from here?"
            ) from None
    cluster = LocalCluster(n_workers=ex.dask_workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster), cluster


def _placement(client) -> list[tuple[str, int, int]]:
    """(address, rank among the workers of its host, workers on its host) for every worker, by address."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        try:
            client.wait_for_workers(1, timeout=60)
        except TimeoutError:
            raise DsmdError("the Dask cluster has no workers (waited 60 s); start some with `dask worker`") from None
        workers = client.scheduler_info(n_workers=-1)["workers"]
    per_host = Counter(info.get("host", address) for address, info in workers.items())
    seen: Counter = Counter()
    placement = []
    for address in sorted(workers):
        host = workers[address].get("host", address)
        placement.append((address, seen[host], per_host[host]))
        seen[host] += 1
    return placement


def _run_dask(cfg: Config, lease: S3WriterLease | None) -> ExtractSummary:
    import dask
    import dask.distributed  # noqa: F401 - loads its config defaults, which config.set below must not shadow

    from stages.extract.worker import fill_on_worker

    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    selected = selected_rows(ds, cfg.extract.splits, cfg.extract.views)
    name = cfg.teacher.name
    # Non-daemonic workers may start DataLoader processes to decode images.
    with dask.config.set({"distributed.worker.daemon": False}):
        client, cluster = _connect(cfg)
        try:
            placement = _placement(client)
            with open_store(cfg, ds, lease) as store:
                tasks = plan_shards(store, name, selected)
                summary = _start_summary(cfg, store, tasks, workers=len(placement))
                # Round robin: every worker gets every n-th shard, so image and text work is spread evenly. Each
                # task creates or checks the arrays itself, so the teacher loads once per worker. The workers write
                # without the lease: they get its fence and check it before every shard and mark themselves.
                fence = lease.fence if lease is not None else None
                futures = [
                    client.submit(fill_on_worker, cfg, owned, rank, on_host, fence,
                                  workers=[address], allow_other_workers=True, pure=False)
                    for index, (address, rank, on_host) in enumerate(placement)
                    # With nothing to do, one worker still checks that the arrays match this teacher setup.
                    if (owned := tasks[index :: len(placement)]) or (index == 0 and not tasks)
                ]
                _follow(futures, store, name, selected, tasks, len(placement), lease)
                errors = [f.exception() for f in futures if f.status == "error"]
                if errors and isinstance(errors[0], StoreError):
                    # e.g. the arrays were made with another teacher setup (--replace-stale may act), or a full disk
                    raise errors[0]
                if errors:
                    raise DsmdError(f"a Dask worker failed: {errors[0]}; finished shards are kept, rerun to resume")
                return _finish(summary, store, [f.result() for f in futures])
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _follow(futures, store: FeatureStore, name: str, selected, tasks: list[ShardTask], n_workers: int,
            lease: S3WriterLease | None) -> None:
    """Progress from the store's marks until every future is done; a lost lease ends the run at once (closing the
    client releases the futures; workers still running stop at their next fence check)."""
    keys = {task.key for task in tasks}

    def update(bar) -> None:
        try:
            left = keys & {task.key for task in plan_shards(store, name, selected)}
        except Exception:  # noqa: BLE001 - a worker may be creating an array this moment: try next tick
            return
        progress.update(bar, completed=len(keys) - len(left))

    with make_progress() as progress:
        bar = progress.add_task(f"extract {name} on {n_workers} Dask workers", total=len(tasks), rate="shards")
        while not all(f.done() for f in futures):
            if lease is not None:
                lease.check()
            update(bar)
            time.sleep(1.0)
        update(bar)
