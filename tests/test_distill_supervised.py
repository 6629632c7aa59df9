"""distill.method=supervised, the no-teacher baseline, through the real training loop on the tiny world: it never
opens the feature store, learns from the captions alone, learns and clamps its temperature, resumes exactly and
keeps the non-finite guard."""

from __future__ import annotations

import json
import math

import distill_helpers
import numpy as np
import pytest
import torch
from distill_helpers import final_weights, load, read_csv, write_params

from pipeline.models.student import load_student
from stages.distill.guard import NonFiniteError
from stages.distill.supervised import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE
from stages.distill.train import Trainer

world = distill_helpers.world
pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 24  # not the oracle's 32 nor the fixture teacher's: the width comes from distill.supervised.dim alone


@pytest.fixture
def no_store(monkeypatch):
    """Any attempt to open a feature store fails the test (the configured store does not exist either)."""
    from stages.distill import methods
    from store.reader import StoreReader

    def refuse(*args, **kwargs):
        raise AssertionError("the supervised baseline opened the feature store")

    monkeypatch.setattr(StoreReader, "__init__", refuse)
    monkeypatch.setattr(methods, "open_store", refuse)


def _params(world, run_dir, **distill):
    changes = {
        "extract": {"store": str(run_dir / "no-such-store.zarr")},
        "distill": {"method": "supervised", "supervised": {"dim": DIM}, **distill},
    }
    return write_params(world, run_dir, changes)


def _logit_scale(out) -> float:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["losses"]["logit_scale"].item()


def test_the_baseline_learns_from_the_captions_without_the_store(world, tmp_path, no_store):
    # From scratch, this tiny student's image features first collapse (the loss sits at chance, ~log 20) and
    # only leave that plateau after some 250-350 steps: 40 epochs of 15 steps leave room for both.
    trainer = Trainer(load(_params(world, tmp_path, epochs=40)))
    untrained = trainer.validate()
    optimizer = trainer.parts.optimizer
    assert [p for p in optimizer.param_groups[1]["params"]] == [trainer.parts.objective.logit_scale]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # CLIP's temperature is not decayed
    summary = trainer.train()
    out = tmp_path / "out"

    rows = read_csv(out / "train_log.csv")
    assert len(rows) == summary["steps"] == 40 * 15 and summary["train_pairs"] == 300
    assert {"i2t", "t2i", "infonce", "temperature", "total", "w_infonce"} <= set(rows[0])
    assert not {"cd", "fd", "sd", "hnd", "kl", "mfd"} & set(rows[0])
    first = np.mean([r["infonce"] for r in rows[:20]])
    last = np.mean([r["infonce"] for r in rows[-20:]])
    assert last < 0.8 * first, (first, last)
    assert all(r["total"] == pytest.approx(r["infonce"], rel=1e-5) for r in rows)  # one loss: the balancer is 1
    val = read_csv(out / "val_log.csv")
    assert max(r["rsum"] for r in val) > untrained["rsum"] + 60, (untrained["rsum"], [r["rsum"] for r in val])

    # The temperature is learnt: it moved from CLIP's 0.07, and the log follows the parameter.
    scale = _logit_scale(out)
    assert scale != pytest.approx(INIT_LOGIT_SCALE, abs=1e-3)
    assert rows[0]["temperature"] == pytest.approx(0.07, rel=1e-3)
    assert rows[-1]["temperature"] == pytest.approx(math.exp(-scale), rel=1e-2)

    card = json.loads((out / "student" / "card.json").read_text())
    assert card["method"] == "supervised" and card["teacher"] is None and card["store"] is None
    assert load_student(out / "student").dim == DIM


def test_the_temperature_is_clamped_at_one_hundredth(world, tmp_path, no_store):
    trainer = Trainer(load(_params(world, tmp_path, epochs=1)))
    with torch.no_grad():
        trainer.parts.objective.logit_scale.fill_(10.0)  # far past log(100): a scale of 22,000
    trainer.train()
    rows = read_csv(tmp_path / "out" / "train_log.csv")
    # Step 1 ran at the clamp; the optimiser step put the parameter back on it, where it can learn again.
    assert rows[0]["temperature"] == pytest.approx(0.01, rel=1e-5)
    assert all(r["temperature"] >= 0.01 * (1 - 1e-6) for r in rows)
    limit = torch.tensor(MAX_LOGIT_SCALE).item()  # log(100) rounded to the parameter's float32
    assert trainer.parts.objective.logit_scale.item() <= limit
    assert _logit_scale(tmp_path / "out") <= limit


def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_result(world, tmp_path, no_store):
    settings = {"epochs": 2, "checkpoint_every": 4}
    reference = tmp_path / "reference"
    Trainer(load(_params(world, reference, **settings))).train()

    run = tmp_path / "stopped"
    params = _params(world, run, **settings)
    trainer = Trainer(load(params))
    step = trainer.loop.optimizer_step

    def stop_at_ten() -> None:
        if trainer.step == 9:  # after the checkpoint of step 8 and a logged step 9 that the rerun must drop
            raise KeyboardInterrupt
        step()

    trainer.loop.optimizer_step = stop_at_ten
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    state = torch.load(run / "out" / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 8 and "logit_scale" in state["losses"]

    resumed = Trainer(load(params))
    assert resumed.step == 8
    resumed.train()
    mine, theirs = read_csv(run / "out" / "train_log.csv"), read_csv(reference / "out" / "train_log.csv")
    assert [r["step"] for r in mine] == list(range(1, 31))
    for a, b in zip(mine, theirs, strict=True):
        a.pop("samples_per_s"), b.pop("samples_per_s")
        assert a == b
    assert _logit_scale(run / "out") == _logit_scale(reference / "out")
    weights, expected = final_weights(run / "out"), final_weights(reference / "out")
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())


def test_the_non_finite_guard_covers_the_temperature(world, tmp_path, no_store):
    params = _params(world, tmp_path, epochs=1)
    trainer = Trainer(load(params))
    trainer.parts.objective.logit_scale.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 1 \(epoch 1\).*no checkpoint was saved"):
        trainer.train()

    # A NaN temperature is never saved, and a checkpoint holding one is never resumed.
    trainer = Trainer(load(params), resume="no")
    trainer._save()
    with torch.no_grad():
        trainer.parts.objective.logit_scale.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"non-finite weights in objective\.logit_scale"):
        trainer._save()
    path = tmp_path / "out" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["losses"]["logit_scale"] = torch.tensor(float("nan"))
    torch.save(state, path)
    with pytest.raises(NonFiniteError, match=r"holds non-finite weights \(objective\.logit_scale\)"):
        Trainer(load(params))
