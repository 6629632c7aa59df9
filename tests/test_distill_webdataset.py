"""Distill and evaluate reading their images inside WebDataset shards: the same tiny run as from the same
images given as files (same teacher rows, same batches, fp32 on the CPU) ends with the same weights, bit for bit,
and the same recalls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distill_helpers import FIXTURE, World, final_weights, load, write_params
from wds_helpers import shards_from_canonical

from pipeline.config import stage_config

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")

CHANGES = {
    "demo": {"n_train": 24, "n_val": 8, "n_test": 8, "captions_per_image": 1},
    "distill": {"teacher": "beit3", "epochs": 1, "batch_size": 8},
    "evaluate": {"ablations": "", "examples": 2},
}


def _run(params):
    from stages.distill.train import Trainer
    from stages.evaluate.run import run_evaluate
    from stages.extract.run import run_extract

    cfg = load(params)
    run_extract(cfg)
    Trainer(cfg).train()
    run_evaluate(stage_config(cfg, "evaluate"))
    return cfg


def _changes(root, name: str, data: dict | None = None) -> dict:
    return {
        **CHANGES,
        "data": data or {},
        "extract": {"store": str(root / name / "features.zarr")},
        "evaluate": {**CHANGES["evaluate"], "out_dir": str(root / name / "evaluate")},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.data.canonical import CanonicalDataset, prepare_dataset
    from stages.demo.shapes import generate_shapes

    root = tmp_path_factory.mktemp("wds-distill")
    world = World(root)
    files = load(write_params(world, root / "files", _changes(root, "files")))
    generate_shapes(files.demo)
    prepare_dataset(files.data)
    shards_from_canonical(CanonicalDataset.load(files.data.canonical_dir), root / "wds", per_shard=16)
    tar_data = {"source": str(root / "wds"), "images_root": str(root / "wds"),
                "canonical_dir": str(root / "canonical-wds"), "name": "shapes-tiny-wds"}
    tars = load(write_params(world, root / "tars", _changes(root, "tars", tar_data)))
    prepare_dataset(tars.data)
    return _run(root / "files" / "params.yaml"), _run(root / "tars" / "params.yaml")


def test_distill_and_evaluate_from_tars_equal_the_same_run_from_files(runs):
    import torch

    files, tars = runs
    weights, expected = final_weights(Path(tars.distill.out_dir)), final_weights(Path(files.distill.out_dir))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name

    metrics = [json.loads((Path(c.evaluate.out_dir) / "metrics.json").read_text()) for c in (files, tars)]
    timings = ("query_ms", "search_ms", "search_batch_ms")
    scores = [{k: v for k, v in m["student"].items() if k not in timings} for m in metrics]
    assert scores[1] == scores[0] and "rsum" in scores[0]
    assert metrics[1]["run"]["n_images"] == metrics[0]["run"]["n_images"] == 8  # every test image decoded
    assert metrics[1]["run"]["n_captions"] == 8
