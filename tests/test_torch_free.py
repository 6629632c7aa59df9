"""The base install (`pip install dsmd`, no extras) is torch-free and still runs the feature store and the bundle
search: a fresh virtual environment gets this source tree without extras, from the same package index and local
wheels as the main environment (pip's own configuration), then answers `dsmd store ...` and
`dsmd search --bundle` on a store and an export bundle built here with the main environment.

The install needs the package index (pip's cache makes it quick): when the index cannot be reached these tests
are skipped, unless CI=true, where that is a failure.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from pipeline.cli import INSTALL_ALL, OPTIONAL_MODULES
from pipeline.retrieval.bundle import search_bundle
from store import FeatureStore
from store.testing import fill, unit_rows

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What a source distribution of dsmd holds (pyproject.toml's readme included); nothing else is copied.
SOURCES = ("pyproject.toml", "README.md", "pipeline", "stages", "store")
UNREACHABLE = (
    "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
    "Network is unreachable", "Max retries exceeded", "ConnectTimeoutError",
)
# The base install measured 246 MB of packages (README, "Install without torch"); the full one is over 5 GB.
BASE_INSTALL_MAX_MB = 600

pytestmark = pytest.mark.install


@dataclasses.dataclass
class BaseEnv:
    venv: Path
    env: dict[str, str]
    install_seconds: float

    def dsmd(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.venv / "bin" / "dsmd"), *args], capture_output=True, text=True, cwd=cwd, env=self.env,
            timeout=120,
        )


def _unreachable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the base install must be tested)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> BaseEnv:
    root = tmp_path_factory.mktemp("base_install")
    source = root / "dsmd"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    venv = root / "venv"
    # No pip inside: the main environment's pip installs into it (`--python`), which saves seeding one.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The tests' own PYTHONPATH (this checkout) must not leak in: the fresh environment runs its installed copy.
    # Installed with --no-compile, its modules are compiled on first import instead: let the first command write
    # the bytecode (all of it under tmp) so that the later ones start several times faster.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
             "--no-compile", "--retries", "2", "--timeout", "30", str(source)],
            capture_output=True, text=True, env=env, timeout=600,
        )
    except subprocess.TimeoutExpired:
        _unreachable("pip install of the base package took over 10 minutes; is the package index reachable?")
    seconds = time.monotonic() - start
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(sign in output for sign in UNREACHABLE):
            _unreachable("the package index cannot be reached: " + output.strip().splitlines()[-1])
        pytest.fail(f"pip install of the base package failed:\n{output[-4000:]}")
    return BaseEnv(venv, env, seconds)


def test_the_base_install_has_none_of_the_extras(base_env):
    probe = "import importlib.util as u, json, sys; print(json.dumps([m for m in sys.argv[1:] if u.find_spec(m)]))"
    result = subprocess.run(
        [str(base_env.venv / "bin" / "python"), "-c", probe, *sorted(OPTIONAL_MODULES)],
        capture_output=True, text=True, env=base_env.env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], "the base install pulled in optional packages"
    torch = subprocess.run([str(base_env.venv / "bin" / "python"), "-c", "import torch"], capture_output=True,
                           text=True, env=base_env.env, timeout=120)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    size_mb = sum(p.stat().st_size for p in base_env.venv.rglob("*") if p.is_file()) / 2**20
    print(f"base install: {size_mb:.0f} MB in {base_env.install_seconds:.1f} s")
    assert size_mb < BASE_INSTALL_MAX_MB


def test_store_commands_run_without_torch(base_env, tmp_path):
    path = tmp_path / "features.zarr"
    with FeatureStore.create_or_open(path, dataset_fingerprint="1" * 64, n_images=40, n_captions=90,
                                     rows_per_shard=16, rows_per_chunk=8, dataset_name="toy") as store:
        for kind, seed in (("image", 1), ("text", 2)):
            store.ensure_array("t", kind, 8, provenance={"teacher": {"name": "t"}})
            fill(store, "t", kind, unit_rows(store.layout.rows(kind), 8, seed), {3: "truncated JPEG"} if kind ==
                 "image" else None)

    info = base_env.dsmd("store", "info", str(path), "--json", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    arrays = json.loads(info.stdout)["arrays"]
    assert [(a["teacher"], a["shape"], a["valid_rows"]) for a in arrays] == [("t", [40, 8], 39), ("t", [90, 8], 90)]
    verify = base_env.dsmd("store", "verify", str(path), cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr
    converted = base_env.dsmd("store", "convert", str(path), str(tmp_path / "features.h5"), cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert (tmp_path / "features.h5").is_file()


def test_bundle_search_answers_without_torch(base_env, export_world, tmp_path):
    result = base_env.dsmd("search", "--bundle", str(export_world.bundle_dir), "--top", "3", "a red circle",
                           cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    expected = search_bundle(export_world.bundle_dir, "a red circle", 3)  # the same bundle, main environment
    assert [int(row[1]) for row in rows] == [hit["id"] for hit in expected]
    assert [float(row[2]) for row in rows] == pytest.approx([hit["score"] for hit in expected], abs=1e-4)
    assert [row[3] for row in rows] == [hit["path"] for hit in expected]


@pytest.mark.parametrize(("command", "named", "module"), [
    (["distill"], "dsmd distill", "torch"),
    (["demo", "teacher"], "dsmd demo teacher", "pyarrow"),
    (["search", "a red circle"], "dsmd search", "torch"),  # without --bundle: the PyTorch student
])
def test_commands_that_need_the_extra_say_so_in_one_line(base_env, tmp_path, command, named, module):
    (tmp_path / "params.yaml").write_text("{}\n")  # all defaults, so that the command gets as far as its imports
    result = base_env.dsmd(*command, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {named} needs {module}, which is not installed: {INSTALL_ALL}"]


# ---------------------------------------------------------------------------------------------------------
# The split itself, checked in the main environment (no install needed).


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_modules(package: str) -> set[str]:
    """Top-level names of the modules that ``package`` imports anywhere (function-local imports included)."""
    names = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"pipeline", "stages", "store", "__future__"}


def test_every_imported_package_is_a_base_dependency_or_an_optional_module():
    """A third-party import is either installed by the base dependencies or named in OPTIONAL_MODULES (so that
    without it a command says which extra it needs), and OPTIONAL_MODULES are exactly the `all` extra's."""
    project = PYPROJECT["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    extra = {_requirement_name(r) for r in project["optional-dependencies"]["all"]}
    extra |= {"distributed"}  # dask[distributed]: the extra's own package
    providers = importlib.metadata.packages_distributions()

    def distributions(module: str) -> set[str]:
        return {name.lower().replace("_", "-") for name in providers.get(module, [])}

    for module in sorted(OPTIONAL_MODULES):
        assert distributions(module) & extra, f"{module} is in OPTIONAL_MODULES but no `all` requirement gives it"
        assert not distributions(module) & base, f"{module} is in OPTIONAL_MODULES but is a base dependency"
    for name in extra:
        assert any(distributions(m) & {name} for m in OPTIONAL_MODULES), f"`all` requirement {name}: no module"
    imported = _imported_modules("pipeline") | _imported_modules("stages") | _imported_modules("store")
    for module in sorted(imported - OPTIONAL_MODULES):
        assert distributions(module) & base, (
            f"{module} is imported but is neither a base dependency in pyproject.toml nor in OPTIONAL_MODULES"
        )
    # store/ and the bundle reader run on the base install alone; s3fs is imported only when an s3:// store is
    # opened (store/remote.py says which extra to install when it is missing).
    torch_free = _imported_modules("store") | _imported_modules("pipeline/retrieval")
    assert torch_free & OPTIONAL_MODULES <= {"faiss", "s3fs"}, "store/ or retrieval imports an optional package"
