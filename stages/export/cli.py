"""`dsmd export` (no torch at import time)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.console import get_config


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        ctx: typer.Context,
        out_dir: Path = typer.Option(None, "--out", help="Output directory (default: export/ beside distill.out_dir)."),
        student_dir: Path = typer.Option(None, "--student", help="Saved student (default: distill.out_dir/student)."),
        index_dir: Path = typer.Option(
            None, "--index", help="Saved image index for the bundle (default: evaluate.out_dir/index/images)."
        ),
        int8: bool = typer.Option(True, "--int8/--no-int8", help="Also write int8 dynamically quantised models."),
        bundle: bool = typer.Option(True, "--bundle/--no-bundle", help="Build the torch-free search bundle."),
        storage: str = typer.Option("int8", "--storage", help="Bundle gallery storage: int8 or float16."),
        encoder: str = typer.Option("int8", "--encoder", help="Bundle text encoder: int8 or float."),
        n_texts: int = typer.Option(64, "--check-texts", min=1, help="Captions of the split for the parity check."),
        n_images: int = typer.Option(16, "--check-images", min=1, help="Images of the split for the parity check."),
    ) -> None:
        """Export the student to ONNX (float, int8) and torch.export, check it, and build a search bundle."""
        from stages.export.run import run_export

        cfg = get_config(ctx)
        run_export(
            cfg,
            out_dir=out_dir or Path(cfg.distill.out_dir).parent / "export",
            student_dir=student_dir or Path(cfg.distill.out_dir) / "student",
            index_dir=index_dir or Path(cfg.evaluate.out_dir) / "index" / "images",
            int8=int8,
            bundle=bundle,
            storage=storage,
            encoder=encoder,
            n_texts=n_texts,
            n_images=n_images,
        )
