"""`dsmd extract`."""

from __future__ import annotations

import typer

from pipeline.config import stage_config
from pipeline.console import config_with


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        ctx: typer.Context,
        device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N (extract.device)."),
        image_batch_size: int | None = typer.Option(None, help="Images per teacher batch."),
        text_batch_size: int | None = typer.Option(None, help="Captions per teacher batch."),
        dtype: str | None = typer.Option(None, help="Store dtype: float16 | float32."),
        workers: int | None = typer.Option(None, help="Image loader worker processes."),
        cpu_threads: int | None = typer.Option(None, help="Torch CPU threads per process (0: the cores left)."),
        dask_workers: int | None = typer.Option(None, help="Local Dask cluster of N workers (0: in-process)."),
        scheduler: str | None = typer.Option(None, help="Address of a running Dask scheduler."),
        replace_stale: bool = typer.Option(
            False, "--replace-stale", help="Delete and rebuild a store made for another dataset or teacher setup."
        ),
        repair: bool = typer.Option(
            False, "--repair", help="Redo exactly the shards `dsmd store verify` flags as damaged (others are kept)."
        ),
    ) -> None:
        """Run the teacher (and extra_teachers) over the dataset and fill the feature store (resumes where a
        killed run stopped)."""
        from stages.extract.run import run_extract_all

        flags = {
            "extract.device": device,
            "extract.image_batch_size": image_batch_size,
            "extract.text_batch_size": text_batch_size,
            "extract.dtype": dtype,
            "extract.loader_workers": workers,
            "extract.cpu_threads": cpu_threads,
            "extract.dask_workers": dask_workers,
            "extract.dask_scheduler": scheduler,
        }
        # Only the settings pipeline/config/stages.py declares for extract: a read of another raises.
        cfg = stage_config(config_with(ctx, flags), "extract")
        run_extract_all(cfg, replace_stale=replace_stale, repair=repair)
