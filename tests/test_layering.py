"""Imports go one way (stages > pipeline > store): the import-linter contracts in pyproject.toml hold, and they
catch a stage importing another stage, store/ importing torch, and an import cycle inside a package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "store")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the tree at `root` in a fresh interpreter, so that the packages it analyses are the
    ones under `root`, not the ones this test process has already imported."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}  # wide: report lines are not wrapped
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=120
    )


def test_the_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_planted_violations_break_the_contracts(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path).returncode == 0  # the copy itself is clean

    _append(tmp_path / "stages/evaluate/run.py", "import stages.distill.losses")
    _append(tmp_path / "store/numeric.py", "import torch")
    _append(tmp_path / "store/layout.py", "from pipeline.errors import DsmdError")
    _append(tmp_path / "pipeline/data/karpathy.py", "from pipeline.data import canonical")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout
    assert "0 kept, 4 broken" in report, report
    assert "stages.evaluate.run -> stages.distill.losses" in report
    assert "store.layout -> pipeline.errors" in report
    assert "store.numeric -> torch" in report
    # The cycle canonical -> karpathy -> canonical, named by the import that would break it.
    assert "No cycles are allowed in pipeline.data" in report and ".karpathy -> .canonical" in report
