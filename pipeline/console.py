"""Console output shared by every command: one rich console on stderr, progress bars, the loaded config."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.config import Config, load_config

console = Console(stderr=True)
T = TypeVar("T")


def make_progress() -> Progress:
    """A progress bar with a rate column; works in CI logs (rich falls back to plain lines without a TTY)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def track(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Iterate with a progress bar showing items/s."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, rate="")
        for item in items:
            yield item
            speed = progress.tasks[task].speed
            progress.update(task, advance=1, rate=f"{speed:.1f}/s" if speed else "")


def get_config(ctx: typer.Context) -> Config:
    """The configuration for this invocation: params.yaml plus --set overrides, read once."""
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    if "config" not in obj:
        obj["config"] = load_config(obj.get("params", "params.yaml"), obj.get("overrides", []))
        root.obj = obj
    return obj["config"]


def config_with(ctx: typer.Context, flags: dict[str, object]) -> Config:
    """The configuration with a command's own options applied on top, as if given with --set; options left
    at None keep the configured value. Checked like every other override."""
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if not extra:
        return get_config(ctx)
    root = ctx.find_root().obj
    return load_config(root["params"], [*root["overrides"], *extra])
