"""`dsmd extract-pairs` (MCAD's fused pair features and alignment maps)."""

from __future__ import annotations

import typer

from pipeline.config import stage_config
from pipeline.console import config_with, console


def register(app: typer.Typer) -> None:
    @app.command("extract-pairs")
    def extract_pairs_command(
        ctx: typer.Context,
        device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N (extract.device)."),
        batch_size: int | None = typer.Option(None, help="Pairs per teacher batch (extract.image_batch_size)."),
        workers: int | None = typer.Option(None, help="Image loader worker processes."),
        align: bool = typer.Option(True, "--align/--no-align", help="Fit the fused -> dual alignment maps."),
        if_mcad: bool = typer.Option(
            False, "--if-mcad", help="Do nothing unless distill.method is mcad (for a shared DVC extract stage)."
        ),
    ) -> None:
        """Encode every training (image, caption) pair jointly with the teacher into <teacher>/pair, then fit
        the linear maps into the dual teachers' spaces (resumes where a killed run stopped)."""

        flags = {
            "extract.device": device,
            "extract.image_batch_size": batch_size,
            "extract.loader_workers": workers,
        }
        cfg = stage_config(config_with(ctx, flags), "extract")
        if if_mcad and cfg.distill.method != "mcad":
            console.print(f"extract-pairs: distill.method is {cfg.distill.method}, nothing to do")
            return
        from stages.extract.pairs import extract_pairs

        extract_pairs(cfg, align=align)
