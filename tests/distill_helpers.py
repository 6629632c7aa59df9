"""A tiny world for the distill tests: shapes dataset, canonical dataset and a feature store, built once per
session under pytest's base temp directory, plus params files for tiny students.

The store holds two teachers:
- ``beit3``: the BEiT-3 fixture (/work/shared/fixtures/beit3-tiny) run by the real extract stage. Its weights
  are random, so its image and text features do not align: good for loss curves, useless for retrieval.
- ``oracle``: written directly with FeatureStore. A pair's feature is a fixed function of the scene (the
  normalised sum of one random vector per object colour), the same for the image and its captions: colours are
  easy to see at 32 pixels and easy to read in a caption, so a tiny student learns it within a few hundred
  steps and then retrieves well above chance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from paths import BEIT3_FIXTURE

FIXTURE = BEIT3_FIXTURE
ORACLE_DIM = 32
N_TRAIN, N_VAL, N_TEST = 60, 20, 10


@dataclass(frozen=True)
class World:
    root: Path

    @property
    def canonical(self) -> Path:
        return self.root / "canonical"

    @property
    def store(self) -> Path:
        return self.root / "features.zarr"

    def base_params(self) -> dict:
        """Settings every distill test shares: this world's data and store, a tiny student, CPU."""
        return {
            "demo": {"out_dir": str(self.root / "shapes"), "n_train": N_TRAIN, "n_val": N_VAL, "n_test": N_TEST,
                     "image_size": 32},
            "data": {"source": str(self.root / "shapes" / "dataset_shapes.json"),
                     "images_root": str(self.root / "shapes" / "images"), "canonical_dir": str(self.canonical),
                     "name": "shapes-tiny"},
            "teacher": {"checkpoint": str(FIXTURE / "checkpoint.pth"), "size": str(FIXTURE / "config.json"),
                        "tokenizer": str(FIXTURE / "tokenizer.spm"), "img_size": 32, "max_text_len": 16},
            "extract": {"store": str(self.store), "rows_per_shard": 64, "rows_per_chunk": 32, "loader_workers": 0,
                        "device": "cpu", "image_batch_size": 32, "text_batch_size": 64},
            # timm's test_vit and a one-layer BERT: a few milliseconds per step on a CPU.
            "student": {"vision_model": "test_vit", "vision_width": 0, "vision_depth": 0, "vision_heads": 0,
                        "img_size": 32, "patch_size": 8, "text_hidden": 32,
                        "text_layers": 1, "text_heads": 2, "max_text_len": 24},
            "distill": {"teacher": "beit3", "epochs": 2, "batch_size": 20, "loader_workers": 0, "device": "cpu",
                        "precision": "fp32", "checkpoint_every": 0, "lr": 1e-3, "lr_step_epochs": [100],
                        "val_batch_size": 64, "losses": {"queue_size": 64}},
            "extra_teachers": [],  # the demo's defaults add its second teacher
            "evaluate": {"batch_size": 64},
        }


def deep_update(tree: dict, changes: dict) -> dict:
    out = dict(tree)
    for key, value in changes.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_params(world: World, run_dir: Path, changes: dict | None = None) -> Path:
    """params.yaml in run_dir: the world's base settings, out_dir run_dir/out, then ``changes`` (nested)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    params = deep_update(world.base_params(), {"distill": {"out_dir": str(run_dir / "out")}})
    params = deep_update(params, changes or {})
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def load(params: Path):
    from pipeline.config import load_config

    return load_config(params)


def read_csv(path: Path) -> list[dict[str, float]]:
    import csv

    with path.open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _oracle_features(world: World, ds) -> tuple[np.ndarray, np.ndarray]:
    from stages.demo.shapes import COLOURS

    rng = np.random.default_rng(1234)
    colour_vec = {c: rng.standard_normal(ORACLE_DIM) for c in COLOURS}
    document = json.loads((world.root / "shapes" / "dataset_shapes.json").read_text())
    by_key = {entry["filename"]: entry["scene"] for entry in document["images"]}
    keys = ds.images.column("key").to_pylist()
    paths = ds.images.column("path").to_pylist()
    images = np.zeros((ds.num_images, ORACLE_DIM))
    for row, (key, path) in enumerate(zip(keys, paths, strict=True)):
        scene = by_key.get(Path(path).name, by_key.get(key))
        for obj in scene["objects"]:
            images[row] += colour_vec[obj["colour"]]
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = images[ds.caption_image_ids()]
    return images.astype(np.float32), texts.astype(np.float32)


def _write_oracle(world: World) -> None:
    from pipeline.data.canonical import CanonicalDataset
    from store import FeatureStore

    ds = CanonicalDataset.load(world.canonical)
    images, texts = _oracle_features(world, ds)
    with FeatureStore.create_or_open(
        world.store, dataset_fingerprint=ds.fingerprint, n_images=ds.num_images, n_captions=ds.num_captions,
        rows_per_shard=64, rows_per_chunk=32,
    ) as store:
        for kind, rows in (("image", images), ("text", texts)):
            store.ensure_array("oracle", kind, ORACLE_DIM, provenance={"teacher": {"name": "oracle"}})
            for shard in store.pending_shards("oracle", kind):
                start, stop = store.shard_rows("oracle", kind, shard)
                store.write_shard("oracle", kind, shard, rows[start:stop])


def build_world(root: Path) -> World:
    """Shapes images -> canonical dataset -> store (real extract for beit3, direct writes for oracle)."""
    from pipeline.data.canonical import prepare_dataset
    from stages.demo.shapes import generate_shapes
    from stages.extract.run import run_extract

    world = World(root)
    cfg = load(write_params(world, root / "build"))
    generate_shapes(cfg.demo)
    prepare_dataset(cfg.data)
    run_extract(cfg)
    _write_oracle(world)
    (root / "ready").write_text("ok\n")
    return world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    # Several test modules import this fixture (each gets its own definition): the marker file in the
    # session's base temp directory makes them share one build.
    root = tmp_path_factory.getbasetemp() / "distill-world"
    if (root / "ready").exists():
        return World(root)
    return build_world(root)




def subprocess_env() -> dict:
    import os

    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def dsmd_command(params: Path, *args: str) -> list[str]:
    import sys

    return [sys.executable, "-c", "from pipeline.cli import main; main()", "--params", str(params), *args]


def final_weights(out: Path) -> dict:
    """The model state in the last checkpoint (the end of training)."""
    import torch

    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
