"""`dsmd data ...`: prepare the canonical dataset, check it, describe it."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.console import console, get_config

__all__ = ["register"]

data_app = typer.Typer(help="Datasets: the canonical dataset, checks.", no_args_is_help=True)


def _counts_table(dataset) -> Table:
    counts = dataset.counts()
    table = Table(title=f"dataset {escape(repr(dataset.name))}", title_justify="left")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("captions", justify="right")
    for split, numbers in counts["splits"].items():
        table.add_row(split, f"{numbers['images']:,}", f"{numbers['captions']:,}")
    table.add_row("all", f"{counts['images']:,}", f"{counts['captions']:,}", style="bold")
    return table


def _print_dataset(dataset) -> None:
    console.print(_counts_table(dataset))
    console.print(f"images root: {dataset.images_root}", highlight=False, markup=False)
    console.print(f"fingerprint: {dataset.fingerprint}", highlight=False, markup=False)
    if dataset.directory is not None:
        console.print(f"canonical dir: {dataset.directory}", highlight=False, markup=False)
    if dataset.dropped:
        console.print(f"[yellow]{len(dataset.dropped):,} caption rows dropped[/yellow] (see dataset.json)")
    shards = dataset.info.get("webdataset")
    if shards:
        truncated = len(shards.get("truncated_shards", []))
        console.print(
            f"WebDataset: {shards.get('shards', 0):,} shards (images read inside them), "
            f"{truncated:,} truncated, {shards.get('missing_from_tar', 0):,} downloaded samples missing from "
            f"their tar, {shards.get('not_downloaded', 0):,} samples never downloaded (img2dataset tables)",
            highlight=False,
        )


def _problem_table(title: str, columns: list[str], rows: list[list[str]], limit: int, total: int) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows[:limit] if limit > 0 else rows:
        table.add_row(*(Text(cell) for cell in row))  # user text: no rich markup
    if 0 < limit < total:
        table.caption = f"{limit} of {total:,} shown; all are in the files named below"
    return table


@data_app.command("prepare")
def prepare(ctx: typer.Context) -> None:
    """Read data.source, check every row and write the canonical dataset to data.canonical_dir."""
    from pipeline.data.canonical import prepare
    from pipeline.data.scan import CanonicalScan

    _print_dataset(CanonicalScan(prepare(get_config(ctx).data)))


@data_app.command("check")
def check(
    ctx: typer.Context,
    workers: int = typer.Option(0, help="Threads decoding images (0 = up to 8, one per core)."),
    limit: int = typer.Option(20, help="Rows shown per problem table (0 = all); the files hold every row."),
) -> None:
    """Decode every image and inspect every caption; report all problems and record the bad images.

    Exits 0 whenever the whole dataset could be checked, also when it found bad images: later stages skip
    those images using the list written here.
    """
    from pipeline.data.bucket import local_shard_cache
    from pipeline.data.canonical import BAD_IMAGES_FILE, CHECK_REPORT_FILE, scan_or_prepare
    from pipeline.data.check import check_dataset

    config = get_config(ctx)
    cfg = config.data
    # Read a batch at a time, not held: a web-scale dataset is checked in bounded memory. Shards in a bucket
    # come whole through the local shard cache (extract.cache_dir / cache_gb), as check reads them in order.
    dataset, prepared = scan_or_prepare(cfg)
    dataset.use_shard_cache(local_shard_cache(config.extract.cache_dir, config.extract.cache_gb))
    if prepared:
        console.print(f"prepared the canonical dataset in {dataset.directory}", highlight=False, markup=False)
    report = check_dataset(dataset, workers=workers or None)

    summary = Table(title=f"check of {escape(repr(dataset.name))}", title_justify="left", show_header=False)
    summary.add_row("images", f"{report.num_images:,}")
    summary.add_row("bad images (skipped by later stages)", f"{len(report.bad_images):,}")
    summary.add_row("captions", f"{report.num_captions:,}")
    summary.add_row("dropped caption rows", f"{len(report.dropped):,}")
    summary.add_row("images without captions", f"{len(report.images_without_captions):,}")
    for kind, count in report.warning_counts().items():
        summary.add_row(f"caption warnings: {kind}", f"{count:,}")
    console.print(summary)

    if report.bad_images:
        rows = [[str(b.image_id), b.path, b.reason] for b in report.bad_images]
        console.print(_problem_table("bad images", ["image_id", "path", "reason"], rows, limit, len(rows)))
    if report.dropped:
        rows = [[d["where"], str(d.get("image_key")), d["reason"]] for d in report.dropped]
        console.print(_problem_table("dropped caption rows", ["row", "image", "reason"], rows, limit, len(rows)))
    if report.images_without_captions:
        shown = report.images_without_captions[:limit] if limit > 0 else report.images_without_captions
        rows = [[str(i), path] for i, path in zip(shown, dataset.image_relpaths(shown), strict=True)]
        console.print(
            _problem_table(
                "images without captions (kept in the gallery)", ["image_id", "path"], rows, limit,
                len(report.images_without_captions),
            )
        )
    if report.caption_warnings:
        rows = [[str(w.caption_id), str(w.image_id), w.kind, w.detail] for w in report.caption_warnings]
        console.print(
            _problem_table(
                "caption warnings (kept)", ["caption_id", "image_id", "kind", "detail"], rows, limit, len(rows)
            )
        )
    assert dataset.directory is not None
    console.print(
        f"wrote {dataset.directory / BAD_IMAGES_FILE} and {dataset.directory / CHECK_REPORT_FILE}",
        highlight=False,
        markup=False,
    )
    verdict = (
        "[green]all images readable[/green]"
        if not report.bad_images
        else (f"[yellow]{len(report.bad_images):,} bad images[/yellow] will be skipped")
    )
    console.print(f"checked {report.num_images:,} images and {report.num_captions:,} captions: {verdict}")


@data_app.command("info")
def info(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print dataset.json to standard output."),
) -> None:
    """Describe the canonical dataset in data.canonical_dir (run `dsmd data prepare` first)."""
    from pipeline.data.canonical import BAD_IMAGES_FILE
    from pipeline.data.check import load_bad_images
    from pipeline.data.scan import CanonicalScan

    cfg = get_config(ctx).data
    dataset = CanonicalScan(cfg.canonical_dir)
    if as_json:
        typer.echo(json.dumps(dataset.card(), indent=2, ensure_ascii=False))
        return
    _print_dataset(dataset)
    source = dataset.info.get("source", {})
    if source:
        console.print(f"source: {source.get('path')} ({source.get('format')})", highlight=False, markup=False)
    if (dataset.directory / BAD_IMAGES_FILE).exists():
        console.print(f"bad images (last check): {len(load_bad_images(dataset.directory)):,}")
    else:
        console.print("not checked yet: run `dsmd data check`")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
