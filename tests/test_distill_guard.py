"""The non-finite guard and safe checkpoints: a NaN teacher row, a NaN loss, a NaN checkpoint, a full disk and
the time-based checkpoint cadence, each on the tiny distill world."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from distill_helpers import load, world, write_params  # noqa: F401

from pipeline.errors import DsmdError
from stages.distill.guard import NonFiniteError, bad_teacher_rows

POISONED_CAPTION = 7


def test_bad_rows_are_non_finite_or_off_the_unit_sphere():
    rows = np.eye(4, dtype=np.float32)
    rows[1, 0] = np.nan
    rows[2] *= 1.5
    rows[3] = np.float16(rows[3])  # float16 rounding stays within tolerance
    assert bad_teacher_rows(rows, np.array([10, 11, 12, 13])) == [11, 12]


def _poison(monkeypatch):
    """Reads of the oracle's caption row POISONED_CAPTION give a NaN, as a shard written by another tool or an
    older writer would (this store's own writer refuses such rows, and its checksums catch later damage)."""
    from store.reader import StoreReader

    real_get = StoreReader.get

    def get(self, teacher, kind, ids, **kwargs):
        rows = real_get(self, teacher, kind, ids, **kwargs)
        if (teacher, kind) == ("oracle", "text"):
            rows[np.asarray(ids) == POISONED_CAPTION, 3] = np.nan
        return rows

    monkeypatch.setattr(StoreReader, "get", get)


def test_a_nan_teacher_row_stops_training_before_it_is_used(world, tmp_path, monkeypatch):  # noqa: F811
    from stages.distill.train import run_distill

    _poison(monkeypatch)
    store = world.store
    params = write_params(world, tmp_path, {"distill": {"teacher": "oracle", "checkpoint_every": 1}})
    with pytest.raises(NonFiniteError) as caught:
        run_distill(load(params))
    message = str(caught.value)
    assert f"oracle/text rows {POISONED_CAPTION}" in message and str(store) in message
    assert "dsmd extract --repair" in message and "\n" not in message
    failing_step = int(message.split("at step ")[1].split(" ")[0])
    assert "caption ids [" in message and str(POISONED_CAPTION) in message.split("caption ids [")[1].split("]")[0]
    checkpoint = tmp_path / "out" / "checkpoints" / "last.pt"
    if failing_step > 1:  # every step before it was saved, and none after
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert state["progress"]["step"] == failing_step - 1
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    else:
        assert not checkpoint.exists()


def test_a_nan_loss_stops_before_the_optimiser_step(world, tmp_path, monkeypatch):  # noqa: F811
    from stages.distill import losses
    from stages.distill.train import Trainer

    params = write_params(world, tmp_path, {"distill": {"teacher": "oracle", "checkpoint_every": 1}})
    original = losses.FeatureDistillation.forward
    calls = {"n": 0}

    def nan_on_the_third(self, *args):
        calls["n"] += 1
        values = original(self, *args)
        if calls["n"] == 4:  # call 1 is the trainer's probe for the value names; 2, 3, 4 are steps 1, 2, 3
            values = {k: v * float("nan") for k, v in values.items()}
        return values

    monkeypatch.setattr(losses.FeatureDistillation, "forward", nan_on_the_third)
    trainer = Trainer(load(params))
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(.*fd nan.*\) at step 3 \(epoch 1\)"):
        trainer.train()
    assert trainer.step == 2  # the NaN step was never applied
    assert torch.load(tmp_path / "out/checkpoints/last.pt", weights_only=True)["progress"]["step"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())


def test_a_nan_gradient_alone_is_caught(world, tmp_path, monkeypatch):  # noqa: F811
    from stages.distill.train import Trainer

    params = write_params(world, tmp_path, {"distill": {"teacher": "oracle"}})
    trainer = Trainer(load(params))
    weight = next(trainer.student.parameters())
    weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 1 \(epoch 1\).*no checkpoint was saved"):
        trainer.train()


def test_a_checkpoint_with_nan_weights_is_never_resumed(world, tmp_path):  # noqa: F811
    from stages.distill.train import Trainer, run_distill

    params = write_params(world, tmp_path, {"distill": {"teacher": "oracle", "epochs": 1}})
    run_distill(load(params))
    path = tmp_path / "out" / "checkpoints" / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name][0] = float("nan")
    torch.save(state, path)
    longer = load(write_params(world, tmp_path, {"distill": {"teacher": "oracle", "epochs": 2}}))
    with pytest.raises(NonFiniteError, match=rf"{path} holds non-finite weights \({name}.*--resume no"):
        Trainer(longer, resume="auto")


def test_a_full_disk_leaves_no_temporary_file_and_the_rerun_resumes(world, tmp_path, monkeypatch):  # noqa: F811
    from stages.distill import checkpoint
    from stages.distill.train import run_distill

    params = write_params(world, tmp_path, {"distill": {"teacher": "oracle", "checkpoint_every": 2}})
    real_save = torch.save
    saves = {"n": 0}

    def full_on_the_second(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            with open(f, "wb") as handle:
                handle.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_on_the_second)
    with pytest.raises(DsmdError) as caught:
        run_distill(load(params))
    ckpt_dir = tmp_path / "out" / "checkpoints"
    message = str(caught.value)
    assert message.startswith(f"no space left on device writing {ckpt_dir / 'last.pt'}") and "\n" not in message
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt"]  # the step-2 checkpoint, no .tmp
    assert torch.load(ckpt_dir / "last.pt", weights_only=True)["progress"]["step"] == 2

    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    summary = run_distill(load(params))  # space is back: resumes from step 2
    assert summary["steps"] == 2 * 15  # 2 epochs of 15 steps (60 images x 5 captions / batch 20)
    assert summary["pairs_per_s"] > 0 and sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt"]


def test_checkpoints_follow_the_clock(world, tmp_path, monkeypatch):  # noqa: F811
    from stages.distill import train

    params = write_params(world, tmp_path, {"distill": {"teacher": "oracle", "epochs": 1,
                                                        "checkpoint_minutes": 0.5}})
    now = {"t": 1000.0}

    def clock():
        now["t"] += 7.0  # every reading is 7 s later: a save falls due every few steps
        return now["t"]

    monkeypatch.setattr(train.time, "monotonic", clock)
    saved = []
    trainer = train.Trainer(load(params))
    original = trainer._save
    monkeypatch.setattr(trainer, "_save", lambda: (saved.append(trainer.step), original())[1])
    trainer.train()
    mid_epoch = [step for step in saved if step < trainer.step]
    assert mid_epoch, saved  # saved within the epoch although checkpoint_every is 0
    assert all(b - a >= 2 for a, b in zip([0, *mid_epoch], mid_epoch, strict=False))
