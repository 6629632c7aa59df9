"""`dsmd store info | verify | convert`: look into, check and convert teacher feature stores."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from store.errors import StoreError
from store.remote import StoreUrl, store_location

# store/ stands alone (no pipeline import), so it keeps its own console, on stderr like the rest of dsmd's output.
console = Console(stderr=True)
store_app = typer.Typer(
    help="Inspect, check and convert teacher feature stores.", no_args_is_help=True, add_completion=False
)


def register(app: typer.Typer) -> None:
    app.add_typer(store_app, name="store")


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _store_path(ctx: typer.Context, path: str | None) -> Path | StoreUrl:
    """The PATH argument, else the configured extract.store: the root command hands a settings lookup down in
    its context (``obj["setting"]``), which keeps this module free of the configuration code."""
    if path is not None:
        return store_location(path)
    root = ctx.find_root().obj
    setting = root.get("setting") if isinstance(root, dict) else None
    if setting is None:
        raise StoreError("no store path given and no settings to take extract.store from; pass the store path")
    return store_location(setting("extract.store"))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@store_app.command("info")
def info(
    ctx: typer.Context,
    path: str | None = typer.Argument(None, help="Store path or s3:// URL (default: extract.store)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout."),
) -> None:
    """Teachers, arrays (shape, dtype, shards complete/total, skipped rows), provenance, size on disk."""
    from rich.table import Table

    from store.info import store_info

    described = store_info(_store_path(ctx, path))
    if as_json:
        typer.echo(json.dumps(described, indent=1))
        return
    meta = described["store"]
    console.print(
        f"[bold]{described['path']}[/bold] ({described['backend']}, {_size(described['size_bytes'])} on disk)\n"
        f"dataset {meta.get('dataset_name') or '?'} fingerprint {meta['dataset_fingerprint']}\n"
        f"{meta['n_images']} image rows, {meta['n_captions']} caption rows, {meta['rows_per_shard']} rows per "
        f"shard, {meta['rows_per_chunk']} per chunk; schema {meta['schema_version']}, created {meta['created_at']}",
        highlight=False,
    )
    table = Table("array", "shape", "dtype", "shards", "valid rows", "skipped")
    for array in described["arrays"]:
        reasons = ", ".join(f"{why} x{n}" for why, n in list(array["skipped_reasons"].items())[:3])
        table.add_row(
            f"{array['teacher']}/{array['kind']}",
            " x ".join(map(str, array["shape"])),
            array["dtype"],
            f"{array['shards_complete']}/{array['shards_total']}",
            str(array["valid_rows"]),
            f"{array['skipped_rows']}" + (f" ({reasons})" if reasons else ""),
        )
    console.print(table)
    for teacher, views in described["views"].items():
        console.print(
            f"views of {teacher}: K = {views['views']} per training image, {_size(views['bytes_per_view'])} per "
            f"view and image (feature row and crop box), {_size(views['bytes_total'])} in all; extracted in "
            f"{views['extract_seconds']:.1f} s",
            highlight=False,
        )
    shown: list[dict] = []
    for array in described["arrays"]:
        if array["provenance"] in shown:
            continue
        shown.append(array["provenance"])
        same = [f"{a['teacher']}/{a['kind']}" for a in described["arrays"] if a["provenance"] == array["provenance"]]
        console.print(f"[bold]provenance[/bold] of {', '.join(same)}:", highlight=False)
        console.print_json(json.dumps(array["provenance"]))


@store_app.command("verify")
def verify(
    ctx: typer.Context,
    path: str | None = typer.Argument(None, help="Store path or s3:// URL (default: extract.store)."),
    dataset: Path | None = typer.Option(None, "--dataset", help="Canonical dataset dir to match fingerprints."),
) -> None:
    """Check every shard: completion mark, checksums, finite unit-norm rows, dataset fingerprint."""
    from store.info import store_info
    from store.verify import verify_store

    path = _store_path(ctx, path)
    try:
        total = sum(a["shards_total"] for a in store_info(path)["arrays"])
    except StoreError:
        total = None  # verify itself will say what is wrong
    with make_progress() as progress:
        task = progress.add_task("verify shards", total=total, rate="")
        report = verify_store(path, dataset_dir=dataset, on_shard=lambda *_: progress.advance(task))
    if report.ok:
        console.print(
            f"[green]ok[/green]: {path}: {report.arrays} arrays, {report.shards_checked} shards, "
            f"{report.rows_checked} rows checked",
            highlight=False,
        )
        return
    console.print(f"[red]{len(report.problems)} problems[/red] in {path}:", highlight=False)
    for problem in report.store_problems:
        console.print(f"  - {problem}", highlight=False, soft_wrap=True)
    damaged = [d for d in report.damaged if d.marked]
    unfinished = [d for d in report.damaged if not d.marked]
    if damaged:
        console.print(f"{len(damaged)} damaged shard(s), by file:", highlight=False)
        for shard in damaged:
            console.print(f"  - {shard.describe()}", highlight=False, soft_wrap=True)
    if unfinished:
        console.print(f"{len(unfinished)} unfinished shard(s) (no completion mark):", highlight=False)
        for shard in unfinished:
            console.print(f"  - {shard.describe()}", highlight=False, soft_wrap=True)
    if damaged:
        pairs = any(shard.kind == "pair" for shard in damaged)
        redo = " (then `dsmd extract-pairs` for pair shards)" if pairs else ""
        console.print(f"fix: `dsmd extract --repair`{redo} redoes exactly these shards; the others are kept",
                      highlight=False, soft_wrap=True)
    elif unfinished:
        console.print("fix: rerun `dsmd extract` (and `dsmd extract-pairs`) to finish them", highlight=False)
    raise typer.Exit(1)


@store_app.command("convert")
def convert(
    src: str = typer.Argument(..., help="Existing store (.zarr directory, .h5 file or s3:// URL)."),
    dst: str = typer.Argument(..., help="New store; its suffix picks the backend (.h5/.hdf5: HDF5, else zarr)."),
    backend: str = typer.Option("auto", help="auto | zarr | hdf5."),
    rows_per_shard: int | None = typer.Option(None, help="Shard size of the copy (default: the source's)."),
) -> None:
    """Copy a store into the other backend, exactly (rerun to resume an interrupted copy)."""
    from store.convert import convert_store
    from store.info import store_info

    total = sum(a["shards_complete"] for a in store_info(src)["arrays"])
    with make_progress() as progress:
        task = progress.add_task("convert shards", total=total, rate="")
        summary = convert_store(
            src, dst, backend=backend, rows_per_shard=rows_per_shard, on_shard=lambda *_: progress.advance(task)
        )
    left = f"; {summary.shards_left} shards wait for an unfinished source" if summary.shards_left else ""
    console.print(
        f"[green]converted[/green] {src} -> {dst} ({summary.backend}): {summary.arrays} arrays, "
        f"{summary.shards_written} shards written{left}",
        highlight=False,
    )
