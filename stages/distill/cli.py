"""`dsmd distill`."""

from __future__ import annotations

import typer

from pipeline.config import stage_config
from pipeline.console import get_config


def register(app: typer.Typer) -> None:
    @app.command("distill")
    def distill(
        ctx: typer.Context,
        resume: bool = typer.Option(
            None,
            "--resume/--fresh",
            help="Resume from the last checkpoint (error if none) or start over. Default: resume when a "
            "checkpoint of the same settings exists.",
        ),
    ) -> None:
        """Train the student on the teacher features in the store (DSMD or MCAD), or on the captions alone
        (distill.method=supervised, the no-teacher baseline)."""
        from stages.distill.train import run_distill

        mode = "auto" if resume is None else ("yes" if resume else "no")
        # Only the settings pipeline/config/stages.py declares for distill: a read of another raises.
        run_distill(stage_config(get_config(ctx), "distill"), resume=mode)
