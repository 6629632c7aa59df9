"""`dsmd teacher ...`: show what a teacher is. No torch import at module level."""

from __future__ import annotations

import json

import typer

from pipeline.console import get_config

teacher_app = typer.Typer(help="The teacher model (BEiT-3 or a CLIP-style dual encoder).", no_args_is_help=True)


@teacher_app.command("info")
def info(ctx: typer.Context) -> None:
    """Load the configured teacher and print its provenance (config, checkpoint and tokenizer SHA-256)."""
    from pipeline.models.teachers import load_teacher

    teacher = load_teacher(get_config(ctx).teacher, device="cpu", precision="fp32")
    typer.echo(json.dumps(teacher.provenance(), indent=2, default=str))


def register(app: typer.Typer) -> None:
    app.add_typer(teacher_app, name="teacher")
