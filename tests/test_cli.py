"""The command line: help everywhere, and failures as one line with a non-zero exit code."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app


def run_dsmd(*args, cwd=None):
    code = "from pipeline.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "config" in result.output


def test_config_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    result = run_dsmd("--set", "distill.lrr=1", "config", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "unknown setting distill.lrr" in lines[0]
    assert "Traceback" not in result.stderr


def test_params_file_is_read_and_overridden(tmp_path):
    (tmp_path / "params.yaml").write_text("distill:\n  epochs: 7\n")
    result = run_dsmd("--set", "distill.lr=0.5", "config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epochs: 7" in result.stdout
    assert "lr: 0.5" in result.stdout
    assert result.stdout.startswith("# Every dsmd setting: params.yaml over the built-in defaults")


def test_missing_params_file_is_one_line_naming_the_fix(tmp_path):
    result = run_dsmd("--params", "nosuch.yaml", "distill", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "nosuch.yaml: no such settings file" in lines[0] and "dsmd config --defaults --out nosuch.yaml" in lines[0]


def test_out_of_range_setting_stops_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("distill:\n  batch_size: -32\n")
    result = run_dsmd("distill", cwd=tmp_path)
    assert result.returncode == 2
    assert "params.yaml: distill.batch_size: -32 is out of range; it must be >= 1" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_config_out_writes_a_full_params_file_over_its_source(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("distill:\n  lr: 3e-4\n  epochs: 9\n")
    result = CliRunner().invoke(app, ["--params", str(params), "-S", "demo.seed=4", "config", "--out", str(params)])
    assert result.exit_code == 0, result.output
    text = params.read_text()
    assert "\n# Overrides: --set demo.seed=4\n" in text and "  epochs: 9\n" in text and "  seed: 4\n" in text
    from pipeline.config import load_config

    assert load_config(params) == load_config(None, ["distill.lr=3e-4", "distill.epochs=9", "demo.seed=4"])


COMMANDS = [
    ["config"], ["demo"], ["demo", "data"], ["demo", "teacher"], ["data"], ["data", "prepare"], ["data", "check"],
    ["data", "info"], ["teacher", "info"], ["extract"], ["extract-pairs"], ["store", "info"], ["store", "verify"],
    ["store", "convert"], ["distill"], ["evaluate"], ["experiments"], ["search"], ["export"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_installed_command_groups_are_the_ones_pyproject_declares():
    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = declared["project"]["entry-points"]["dsmd.commands"]
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="dsmd.commands")}
    assert installed == declared, "the installed metadata is stale: run `pip install -e .`"


def test_without_installed_commands_the_cli_says_how_to_install_them(tmp_path):
    code = ("import importlib.metadata as m; m.entry_points = lambda **kw: m.EntryPoints(())\n"
            "from pipeline.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install -e ." in lines[0], result.stderr
    assert "Usage" not in result.stdout


def test_store_commands_default_to_the_configured_store(tmp_path):
    missing = tmp_path / "elsewhere.zarr"
    (tmp_path / "params.yaml").write_text("{}\n")  # all defaults: a missing settings file is an error
    result = run_dsmd("--set", f"extract.store={missing}", "store", "info", cwd=tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_help_does_not_import_torch():
    code = "import sys; from pipeline.cli import app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_error_text_is_not_read_as_markup(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    result = run_dsmd("--set", "distill.x[red]y=1", "config", cwd=tmp_path)
    assert result.returncode == 2
    assert "x[red]y" in result.stderr


def test_command_options_apply_as_overrides(tmp_path):
    (tmp_path / "params.yaml").write_text("extract:\n  image_batch_size: 8\n")
    captured = {}

    @app.command("probe-config-with", hidden=True)
    def probe(ctx: typer.Context, size: int = typer.Option(None)) -> None:
        from pipeline.console import config_with

        captured["cfg"] = config_with(ctx, {"extract.image_batch_size": size, "extract.device": None})

    try:
        runner = CliRunner()
        assert runner.invoke(app, ["-p", str(tmp_path / "params.yaml"), "probe-config-with"]).exit_code == 0
        assert captured["cfg"].extract.image_batch_size == 8
        result = runner.invoke(app, ["-p", str(tmp_path / "params.yaml"), "-S", "extract.device=cpu",
                                     "probe-config-with", "--size", "3"])
        assert result.exit_code == 0, result.output
        assert captured["cfg"].extract.image_batch_size == 3 and captured["cfg"].extract.device == "cpu"
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "probe-config-with"]


# ---------------------------------------------------------------------------------------------------------
# A base install (`pip install dsmd`, no extras): commands that need a missing extra say so in one line.
# tests/test_torch_free.py runs the real thing in a fresh virtual environment.


class _EntryPointWithout:
    """An entry point whose module imports an uninstalled package, as a stage's cli.py would without torch."""

    def __init__(self, name: str, missing: str):
        self.name, self.value, self.missing = name, f"stages.{name}.cli:register", missing

    def load(self):
        raise ModuleNotFoundError(f"No module named '{self.missing}'", name=self.missing)


def run_main(monkeypatch, capsys, target, *args) -> tuple[int, list[str]]:
    import pipeline.cli

    monkeypatch.setattr(pipeline.cli, "app", target)
    monkeypatch.setattr(sys, "argv", ["dsmd", *args])
    with pytest.raises(SystemExit) as stop:
        pipeline.cli.main()
    err = capsys.readouterr().err
    return stop.value.code, [line for line in err.splitlines() if line.strip()]


def test_a_group_that_cannot_load_without_an_extra_leaves_the_others_working(monkeypatch, capsys):
    from pipeline.cli import _register_commands

    target = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    store = importlib.metadata.EntryPoint("store", "store.cli:register", "dsmd.commands")
    assert _register_commands(target, [_EntryPointWithout("extract", "torch.nn"), store]) is None

    code, lines = run_main(monkeypatch, capsys, target, "extract", "--replace-stale", "x")
    assert code == 2
    assert lines == ["error: dsmd extract needs torch, which is not installed: pip install 'dsmd[all]'"]
    code, lines = run_main(monkeypatch, capsys, target, "extract", "--help")
    assert code == 2 and len(lines) == 1 and "needs torch" in lines[0]

    result = CliRunner().invoke(target, ["store", "info", "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    listed = CliRunner().invoke(target, ["--help"]).output
    assert "store" in listed and "needs torch" in listed


def test_a_missing_module_of_our_own_still_reports_stale_metadata():
    from pipeline.cli import _register_commands

    problem = _register_commands(typer.Typer(), [_EntryPointWithout("extract", "stages.extract.gone")])
    assert problem is not None and "pip install -e ." in problem


def test_a_command_that_imports_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    target = typer.Typer(pretty_exceptions_enable=False)
    group = typer.Typer()
    target.add_typer(group, name="demo")

    @group.command("teacher")
    def teacher(steps: int = 1) -> None:
        import torch  # noqa: F401 - blocked below, as in an install without the `all` extra

    @group.command("broken")
    def broken() -> None:
        import no_such_module_dsmd  # noqa: F401 - not an extra: a bug, which keeps its traceback

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ModuleNotFoundError
    code, lines = run_main(monkeypatch, capsys, target, "demo", "teacher", "--steps", "3")
    assert code == 2
    assert lines == ["error: dsmd demo teacher needs torch, which is not installed: pip install 'dsmd[all]'"]
    import pipeline.cli

    monkeypatch.setattr(sys, "argv", ["dsmd", "demo", "broken"])
    with pytest.raises(ModuleNotFoundError, match="no_such_module_dsmd"):
        pipeline.cli.main()
