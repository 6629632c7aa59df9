"""distill.method=mcad on the tiny world: fused pairs from the BEiT-3 fixture, two dual teachers (oracle and
beit3, of other dimensions), the MCAD losses with and without the DSMD losses, through the real training loop."""

from __future__ import annotations

import shutil

import distill_helpers
import numpy as np
import pytest
from distill_helpers import load, read_csv, write_params

from pipeline.errors import DsmdError
from stages.distill.train import Trainer
from stages.extract.pairs import extract_pairs

world = distill_helpers.world
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mcad_store(world, tmp_path_factory):
    """A copy of the world's store (others share the original) with beit3/pair and the two alignment maps."""
    root = tmp_path_factory.mktemp("mcad")
    store = root / "features.zarr"
    shutil.copytree(world.store, store)
    params = write_params(world, root / "extract", mcad_changes(store))
    summary = extract_pairs(load(params))
    assert set(summary.alignments) == {"oracle", "beit3"}
    return store


def mcad_changes(store, **mcad) -> dict:
    return {
        "extract": {"store": str(store)},
        "distill": {
            "method": "mcad", "teacher": "oracle", "epochs": 3,
            "mcad": {"fused_teacher": "beit3", "teachers": ["oracle", "beit3"], "teacher_weights": [1.0, 0.5],
                     "temperature": 0.1, **mcad},
        },
    }


def test_mcad_training_logs_and_learns_the_first_teachers_modified_features(world, mcad_store, tmp_path):
    summary = Trainer(load(write_params(world, tmp_path, mcad_changes(mcad_store)))).train()
    rows = read_csv(tmp_path / "out" / "train_log.csv")
    assert summary["steps"] == len(rows) == 45
    assert {"kl", "kl_i2t", "kl_t2i", "mfd", "mfd_v", "mfd_t", "w_kl", "w_mfd"} <= set(rows[0])
    assert "cd" not in rows[0]
    # The student moves towards the first teacher's modified features; the mixed distribution (half of it from
    # the random-weight beit3 fixture) is harder to match in 45 steps, but the KL falls too.
    for name, ratio in (("kl", 0.95), ("mfd", 0.85)):
        values = [r[name] for r in rows]
        assert np.isfinite(values).all()
        assert np.mean(values[-10:]) < ratio * np.mean(values[:10]), name


def test_mcad_with_the_dsmd_losses_in_one_balancer(world, mcad_store, tmp_path):
    changes = mcad_changes(mcad_store, dsmd_losses=True)
    changes["distill"]["epochs"] = 1
    Trainer(load(write_params(world, tmp_path, changes))).train()
    rows = read_csv(tmp_path / "out" / "train_log.csv")
    for name in ("cd", "fd", "sd", "hnd", "kl", "mfd"):
        assert f"w_{name}" in rows[0]
    assert rows[-1]["total"] == pytest.approx(
        sum(rows[-1][f"w_{n}"] * rows[-1][f"a_{n}"] * rows[-1][n] for n in ("cd", "fd", "sd", "hnd", "kl", "mfd")),
        rel=1e-4,
    )


def test_mcad_refuses_a_student_teacher_other_than_the_first(world, mcad_store, tmp_path):
    changes = mcad_changes(mcad_store)
    changes["distill"]["teacher"] = "beit3"
    with pytest.raises(DsmdError, match="first of distill.mcad.teachers"):
        Trainer(load(write_params(world, tmp_path, changes)))
