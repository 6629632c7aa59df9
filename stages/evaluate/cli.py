"""Command-line hook of the evaluation stage (no torch at import time).

`dsmd evaluate` (student + feature store -> metrics and report) is wired here by the evaluate stage itself;
this module only provides the `register` entry point that `pipeline.cli` calls.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to the `dsmd` app. None yet: `evaluate` lands with the stage runner."""
