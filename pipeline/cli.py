"""The `dsmd` command line: the root command, `dsmd config`, and the command groups that the installed packages
declare as entry points (group dsmd.commands in pyproject.toml). Commands stay thin: they read the config and
call into the stage packages, importing them inside each command so that `dsmd --help` does not pay for torch.
"""

from __future__ import annotations

import importlib.metadata
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
    params: Path = typer.Option(
        Path("params.yaml"), "--params", "-p",
        help="Settings file (DVC's params.yaml); settings it leaves out keep their defaults.",
    ),
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
def show_config(
    ctx: typer.Context,
    defaults: bool = typer.Option(
        False, "--defaults", help="Start from the built-in defaults (the demo) instead of the params file."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write to this file (whole or not at all) instead of printing; e.g. params.yaml."
    ),
) -> None:
    """Print every setting (the params file, missing keys at their defaults, plus --set overrides) as YAML: the
    full params.yaml that DVC needs, e.g. from a recipe: dsmd --params recipes/flickr30k.yaml config --out
    params.yaml"""
    from pipeline.config import DEFAULTS_HEADER, dump_config, load_config, write_config

    root = ctx.find_root().obj
    overrides = root["overrides"]
    cfg = load_config(None, overrides) if defaults else get_config(ctx)
    if defaults and not overrides:
        header = DEFAULTS_HEADER
    else:
        source = "the built-in defaults" if defaults else f"{root['params']} over the built-in defaults"
        header = (
            f"Every dsmd setting: {source}, written by `dsmd config`.\n"
            "DVC reads params.yaml too and needs every key that dvc.yaml names, so all are here.\n"
            "pipeline/config/schema.py gives each setting's meaning and allowed range."
        )
        if overrides:
            header += "\nOverrides: --set " + " --set ".join(overrides)
    if out is None:
        typer.echo(dump_config(cfg, header), nl=False)
    else:
        write_config(cfg, out, header)
        console.print(f"settings written to {out}", highlight=False)


COMMANDS_GROUP = "dsmd.commands"
# The top-level modules that the `all` extra installs (pyproject.toml; tests/test_torch_free.py keeps the two in
# step). Without them the base install still runs `dsmd store ...` and `dsmd search --bundle`; a command that
# needs one says so in one line instead of a traceback. A missing module outside this set is a bug or a broken
# environment, and keeps its traceback.
OPTIONAL_MODULES = frozenset({
    "torch", "torchvision", "pyarrow", "dask", "distributed", "timm", "transformers", "safetensors",
    "sentencepiece", "faiss", "onnx", "onnxscript", "matplotlib", "dvc", "s3fs",
})
INSTALL_ALL = "pip install 'dsmd[all]'"


def missing_optional_module(exc: BaseException) -> str | None:
    """The optional module (torch, pyarrow, ...) whose absence raised ``exc``, else None."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.partition(".")[0]
        if top in OPTIONAL_MODULES:
            return top
    return None


def needs_message(command: str, module: str) -> str:
    return f"{command} needs {module}, which is not installed: {INSTALL_ALL}"


def _running_command(tb) -> str:
    """'dsmd demo teacher': the command an exception came from, read off the deepest command context among the
    traceback's frames (click has closed the contexts by the time the exception reaches main). Contexts are
    recognised by their attributes: typer may bring its own copy of click, whose classes are not click's."""
    context = None
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if all(hasattr(value, name) for name in ("command_path", "info_name", "parent", "invoked_subcommand")):
                context = value
        tb = tb.tb_next
    names = []
    while context is not None and context.parent is not None:  # the root's own name is however python was started
        names.append(context.info_name)
        context = context.parent
    return " ".join(["dsmd", *reversed(names)])


def _unavailable_group(target: typer.Typer, name: str, module: str) -> None:
    """Stand-in for a command group whose module cannot be imported without ``module``: ``dsmd NAME ...`` (any
    arguments) fails with the one-line message, and every other command still works."""

    @target.command(
        name,
        help=f"(not installed: needs {module}; {INSTALL_ALL})",
        add_help_option=False,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def unavailable() -> None:
        raise DsmdError(needs_message(f"dsmd {name}", module))


def _register_commands(target: typer.Typer, entry_points=None) -> str | None:
    """Attach every command group that an installed package declares under [project.entry-points."dsmd.commands"]
    (name = "module:register"). The stages register themselves this way, so this shared module names none of
    them; each `register` module is light (no torch import at module level). Returns what went wrong, if anything.
    """
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=COMMANDS_GROUP)
    if not entry_points:
        # A source tree on PYTHONPATH without installed metadata (or installed before the entry points existed).
        return f"no dsmd commands are installed (entry points {COMMANDS_GROUP}); run `pip install -e .` in the repo"
    for entry_point in entry_points:
        try:
            register = entry_point.load()
        except (ImportError, AttributeError) as exc:
            module = missing_optional_module(exc)
            if module is not None:
                _unavailable_group(target, entry_point.name, module)
                continue
            return (f"command group {entry_point.name} = {entry_point.value} cannot be loaded ({exc}); the installed "
                    "metadata may be stale: run `pip install -e .` again")
        register(target)
    return None


_REGISTRATION_PROBLEM = _register_commands(app)


def main() -> None:
    if _REGISTRATION_PROBLEM is not None:
        _fail(_REGISTRATION_PROBLEM)
    # Click handles usage errors itself (exit 2); our own errors are printed as one line, no traceback.
    try:
        app()
    except (DsmdError, StoreError) as exc:
        # The message may hold user paths like "a[1].jpg": print it as plain text, never as rich markup.
        _fail(str(exc))
    except ModuleNotFoundError as exc:
        module = missing_optional_module(exc)
        if module is None:
            raise
        # A base install (`pip install dsmd`) running a command that needs the `all` extra.
        _fail(needs_message(_running_command(exc.__traceback__), module))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]; finished work is kept, rerun the command to resume")
        sys.exit(130)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
