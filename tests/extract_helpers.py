"""Builders for the extract stage's tests: a tiny shapes dataset, params.yaml for the fixture teacher, and a
store's whole contents for comparing two extractions."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from paths import BEIT3_FIXTURE

from pipeline.config import Config, load_config

FIXTURE = BEIT3_FIXTURE
if not FIXTURE.is_dir():
    FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "beit3-tiny"

TEACHER = "beit3-tiny"
# Running `dsmd` as the tests' interpreter runs it: the same venv, no console script needed.
DSMD = [sys.executable, "-c", "from pipeline.cli import main; main()"]


@dataclass
class World:
    root: Path

    @property
    def canonical(self) -> Path:
        return self.root / "canonical"

    @property
    def images(self) -> Path:
        return self.root / "shapes" / "images"


def base_params(world: World) -> dict:
    return {
        "demo": {"out_dir": str(world.root / "shapes"), "n_train": 24, "n_val": 4, "n_test": 8, "image_size": 32,
                 "captions_per_image": 3},
        "data": {"source": str(world.root / "shapes" / "dataset_shapes.json"), "images_root": str(world.images),
                 "canonical_dir": str(world.canonical), "name": "shapes-test"},
        "teacher": {"name": TEACHER, "checkpoint": str(FIXTURE / "checkpoint.pth"),
                    "size": str(FIXTURE / "config.json"), "tokenizer": str(FIXTURE / "tokenizer.spm"),
                    "img_size": 32, "max_text_len": 16},
        # Small shards, so a handful of images already spans several; one torch thread (tiny matrices gain
        # nothing from more, and on a busy machine spinning threads cost far more than they give).
        "extract": {"device": "cpu", "rows_per_shard": 8, "rows_per_chunk": 8, "image_batch_size": 4,
                    "text_batch_size": 8, "loader_workers": 0, "cpu_threads": 1},
        "extra_teachers": [],  # the demo's defaults add its second teacher
    }


def build_world(root: Path, **demo) -> World:
    """Shapes images (32 px; 24 train, 4 val, 8 test; 3 captions each) and their canonical dataset."""
    from pipeline.data.canonical import prepare_dataset
    from stages.demo.shapes import generate_shapes

    world = World(root)
    params = base_params(world)
    params["demo"].update(demo)
    cfg = load_config(write_params(world, root / "build", params))
    generate_shapes(cfg.demo)
    prepare_dataset(cfg.data)
    return world


def write_params(world: World, run_dir: Path, params: dict | None = None, **extract) -> Path:
    """run_dir/params.yaml: the base settings, a store in run_dir, then the extract settings given."""
    params = params or base_params(world)
    params = {**params, "extract": {**params["extract"], "store": str(run_dir / "features.zarr"), **extract}}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def config(world: World, run_dir: Path, **extract) -> Config:
    return load_config(write_params(world, run_dir, **extract))


@dataclass
class Contents:
    """Everything an extraction leaves in a store for one teacher."""

    rows: dict[str, np.ndarray]  # kind -> rows as stored (float16)
    valid: dict[str, np.ndarray]
    skipped: dict[str, dict[int, str]]


def read_store(path: Path, canonical: Path, teacher: str = TEACHER) -> Contents:
    from pipeline.data.canonical import CanonicalDataset
    from store import open_store

    ds = CanonicalDataset.load(canonical)
    rows, valid, skipped = {}, {}, {}
    with open_store(path, dataset_fingerprint=ds.fingerprint, teacher=teacher) as reader:
        for kind, n in (("image", ds.num_images), ("text", ds.num_captions)):
            rows[kind] = reader.get(teacher, kind, np.arange(n), dtype=None)
            valid[kind] = reader.valid(teacher, kind)
            skipped[kind] = reader.skipped(teacher, kind)
    return Contents(rows, valid, skipped)


def assert_same_contents(a: Contents, b: Contents) -> None:
    for kind in ("image", "text"):
        np.testing.assert_array_equal(a.rows[kind], b.rows[kind], err_msg=f"{kind} rows differ")
        np.testing.assert_array_equal(a.valid[kind], b.valid[kind], err_msg=f"{kind} valid masks differ")
        assert a.skipped[kind] == b.skipped[kind], f"{kind} skipped rows differ"


def marks(store: Path, teacher: str = TEACHER) -> dict[tuple[str, int], tuple[int, str]]:
    """(kind, shard) -> (mtime in ns, text) of every completion mark."""
    found = {}
    for kind in ("image", "text"):
        for path in sorted((store / teacher / kind / "marks").glob("shard-*.json")):
            found[(kind, int(path.stem.split("-")[1]))] = (path.stat().st_mtime_ns, path.read_text())
    return found
