"""The `dsmd` command line. Commands stay thin: they read the config and call into the stage packages.

Stage modules are imported inside each command so that `dsmd --help` does not pay for importing torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from pipeline.console import console, get_config
from pipeline.errors import DsmdError
from store.errors import StoreError

app = typer.Typer(
    name="dsmd",
    help="Distil a large vision-language teacher into a small dual-encoder retriever.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    params: Path = typer.Option(Path("params.yaml"), "--params", "-p", help="Settings file (DVC's params.yaml)."),
    overrides: list[str] = typer.Option(
        [], "--set", "-S", help="Override a setting, e.g. --set distill.lr=3e-4 (repeatable)."
    ),
) -> None:
    ctx.obj = {"params": params, "overrides": list(overrides)}
    # Command groups that must not import the configuration code (store/) read a setting through this.
    ctx.obj["setting"] = lambda dotted: _setting(get_config(ctx), dotted)


def _setting(cfg: object, dotted: str) -> object:
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """Print the effective configuration (params.yaml plus overrides) as YAML."""
    from pipeline.config import dump_config

    typer.echo(dump_config(get_config(ctx)))


def _register_optional() -> None:
    """Attach the stage command groups that exist. Each stage package has a light `cli` module."""
    import importlib

    for module_name in (
        "pipeline.data.cli",
        "pipeline.models.cli",
        "store.cli",
        "stages.extract.cli",
        "stages.extract.pairs_cli",
        "stages.distill.cli",
        "stages.evaluate.cli",
        "stages.export.cli",
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.register(app)


_register_optional()


def main() -> None:
    # Click handles usage errors itself (exit 2); our own errors are printed as one line, no traceback.
    try:
        app()
    except (DsmdError, StoreError) as exc:
        # The message may hold user paths like "a[1].jpg": print it as plain text, never as rich markup.
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]; finished work is kept, rerun the command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
