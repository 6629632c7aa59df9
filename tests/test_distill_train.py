"""The training loop on a tiny world, in-process on the CPU: learning, logs, ablations, resume decisions."""

from __future__ import annotations

import json
import sys

import distill_helpers
import numpy as np
import pytest
import torch
from distill_helpers import load, read_csv, write_params

from pipeline.models.student import load_student
from stages.distill.train import Trainer

# Fixtures shared by the distill test modules.
world = distill_helpers.world
pytestmark = pytest.mark.usefixtures("one_thread")

LOSSES = ("cd", "fd", "sd", "hnd")


def test_training_drives_every_loss_down_and_validation_recall_up(world, tmp_path):
    # The oracle teacher can be learnt (see distill_helpers). A margin of 0.2 keeps HND from reaching 0: with
    # alpha = 0 its hinge vanishes within a few dozen steps on 60 images, the balancer's magnitude term then
    # multiplies it by ~100 and the few active hinges scramble the image encoder of this tiny student.
    params = write_params(
        world, tmp_path, {"distill": {"teacher": "oracle", "epochs": 16, "losses": {"margin": 0.2}}}
    )
    trainer = Trainer(load(params))
    untrained = trainer.validate()
    summary = trainer.train()
    out = tmp_path / "out"

    rows = read_csv(out / "train_log.csv")
    assert [r["step"] for r in rows] == list(range(1, 16 * 15 + 1))
    assert summary["steps"] == 240 and summary["train_pairs"] == 300
    # CD is 0 at step 1 (empty queue): compare steps 2-21 with the last 20.
    for name in LOSSES:
        first = np.mean([r[name] for r in rows[1:21]])
        last = np.mean([r[name] for r in rows[-20:]])
        assert last < 0.8 * first, (name, first, last)

    val = read_csv(out / "val_log.csv")
    assert [r["epoch"] for r in val] == list(range(1, 17))
    late = np.mean([r["rsum"] for r in val[-3:]])
    assert late > untrained["rsum"] + 60, (untrained["rsum"], [r["rsum"] for r in val])

    # The best epoch's student is saved whole and reproduces its logged validation score.
    best = max(val, key=lambda r: r["rsum"])
    card = json.loads((out / "student" / "card.json").read_text())
    assert card["epoch"] == best["epoch"] == summary["best_epoch"]
    assert card["val_metrics"]["rsum"] == pytest.approx(best["rsum"])
    assert not (out / "student.partial").exists()
    student = load_student(out / "student")
    assert student.dim == 32
    assert json.loads((out / "summary.json").read_text())["best_val_rsum"] == pytest.approx(best["rsum"])
    # The same numbers for `dvc metrics show`, one file per measure in the student's column.
    assert json.loads((out / "metrics" / "best_val_rsum.json").read_text()) == {"student": pytest.approx(best["rsum"])}


@pytest.mark.parametrize(
    "changes",
    [{"losses": {"cd": False}}, {"losses": {"fd": False}}, {"losses": {"sd": False}}, {"losses": {"hnd": False}},
     {"balancer": {"enabled": False}}],
    ids=["no-cd", "no-fd", "no-sd", "no-hnd", "no-balancer"],
)
def test_ablations_from_configuration(world, tmp_path, changes):
    params = write_params(world, tmp_path, {"distill": {"epochs": 1, **changes}})
    Trainer(load(params)).train()
    with (tmp_path / "out" / "train_log.csv").open() as handle:
        header = handle.readline().strip().split(",")
    rows = read_csv(tmp_path / "out" / "train_log.csv")
    assert len(rows) == 15
    off = [name for name in LOSSES if changes.get("losses", {}).get(name) is False]
    on = [name for name in LOSSES if name not in off]
    for name in off:
        assert not [c for c in header if c == name or c.startswith(f"{name}_") or c.endswith(f"_{name}")]
    for name in on:
        assert {name, f"w_{name}", f"a_{name}", f"r_{name}"} <= set(header)
    balanced = changes.get("balancer", {}).get("enabled", True)
    for row in rows:
        if balanced:
            expected = sum(row[f"w_{n}"] * row[f"a_{n}"] * row[n] for n in on)
        else:
            assert all(row[f"w_{n}"] == 1.0 and row[f"a_{n}"] == 1.0 for n in on)
            expected = sum(row[n] for n in on)
        assert row["total"] == pytest.approx(expected, rel=1e-4)


def test_validation_scores_distills_own_ks_not_evaluates(world, tmp_path):
    """distill.val_ks choose the student that is kept (DVC reruns distill when they change); evaluate.ks are
    evaluate's alone."""
    params = write_params(world, tmp_path, {"distill": {"epochs": 1, "val_ks": [1, 3], "val_batch_size": 7},
                                            "evaluate": {"ks": [5], "batch_size": 1}})
    summary = Trainer(load(params)).train()
    (row,) = read_csv(tmp_path / "out" / "val_log.csv")
    recalls = ["i2t_r1", "i2t_r3", "t2i_r1", "t2i_r3"]
    assert set(row) == {"step", "epoch", *recalls, "rsum"}
    assert row["rsum"] == pytest.approx(sum(row[k] for k in recalls), abs=1e-3)
    assert summary["best_val_rsum"] == pytest.approx(row["rsum"])


def test_gradient_accumulation_never_splits_a_step_across_epochs(world, tmp_path):
    # 300 pairs in micro-batches of 20: 15 micro-batches, 7 whole steps of 2 per epoch (the 15th is left out).
    params = write_params(world, tmp_path, {"distill": {"epochs": 2, "batch_size": 40, "grad_accum": 2}})
    summary = Trainer(load(params)).train()
    rows = read_csv(tmp_path / "out" / "train_log.csv")
    assert summary["steps"] == 14
    assert [int(r["epoch"]) for r in rows] == [0] * 7 + [1] * 7


def test_checkpoint_of_other_settings_starts_fresh_in_auto_mode(world, tmp_path, capsys):
    params = write_params(world, tmp_path, {"distill": {"epochs": 1}})
    Trainer(load(params)).train()
    first = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["digest"]

    other = write_params(world, tmp_path, {"distill": {"epochs": 1, "lr": 5e-4}})
    capsys.readouterr()
    trainer = Trainer(load(other))
    assert "other settings" in capsys.readouterr().err
    assert trainer.step == 0 and trainer.epoch == 0
    # The fresh run's logs start empty: nothing of the first run is mixed in.
    assert read_csv(tmp_path / "out" / "train_log.csv") == []
    trainer.train()
    assert torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["digest"] != first


def test_a_finished_run_is_kept_and_can_be_extended(world, tmp_path):
    params = write_params(world, tmp_path, {"distill": {"epochs": 1}})
    Trainer(load(params)).train()
    summary_file = tmp_path / "out" / "summary.json"
    before = summary_file.read_text()
    # Rerunning a finished run does nothing and keeps its summary.
    assert Trainer(load(params)).train()["steps"] == 15
    assert summary_file.read_text() == before
    # More epochs resume it (epochs is a run-time setting).
    longer = write_params(world, tmp_path, {"distill": {"epochs": 2}})
    assert Trainer(load(longer)).train()["steps"] == 30
    assert [r["epoch"] for r in read_csv(tmp_path / "out" / "val_log.csv")] == [1, 2]


def test_a_finished_run_whose_student_is_gone_trains_again(world, tmp_path, capsys):
    """As under `dvc repro` after a code change: DVC deletes the stage's outputs (the student), not the
    checkpoints; "nothing to do" would leave no student, so the rerun trains again, to the same weights."""
    import shutil

    params = write_params(world, tmp_path, {"distill": {"epochs": 1}})
    Trainer(load(params)).train()
    weights = tmp_path / "out" / "student" / "model.safetensors"
    before = weights.read_bytes()
    shutil.rmtree(weights.parent)
    capsys.readouterr()
    assert Trainer(load(params)).train()["steps"] == 15
    assert "holds a finished run, but its student" in capsys.readouterr().err
    assert weights.read_bytes() == before


def _cli(monkeypatch, params, *args) -> int:
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["dsmd", "--params", str(params), *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_resume_flag_without_checkpoint_is_a_one_line_error(world, tmp_path, monkeypatch, capsys):
    params = write_params(world, tmp_path, {"distill": {"epochs": 1}})
    assert _cli(monkeypatch, params, "distill", "--resume") == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err and "last.pt" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3  # one message, soft-wrapped


def test_resume_flag_with_checkpoint_of_other_settings_is_an_error(world, tmp_path, monkeypatch, capsys):
    params = write_params(world, tmp_path, {"distill": {"epochs": 1}})
    Trainer(load(params)).train()
    other = write_params(world, tmp_path, {"distill": {"epochs": 1, "losses": {"tau": 0.1}}})
    capsys.readouterr()
    assert _cli(monkeypatch, other, "distill", "--resume") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "without --resume" in err and "Traceback" not in err
