"""Kill `dsmd distill` with SIGKILL in the middle of an epoch, rerun it, and get the uninterrupted run's result.

Exact equality holds because everything a step depends on is in the checkpoint or a function of (seed, epoch):
the batch order, model, optimiser, scheduler, CD queues, balancer state and the global RNG (BERT's dropout).
Both runs use one intra-op thread, so the floating-point reductions are the same.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import time

import distill_helpers
import pytest
import torch
from distill_helpers import dsmd_command, final_weights, load, read_csv, subprocess_env, write_params

from stages.distill.train import Trainer

world = distill_helpers.world
pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS, STEPS_PER_EPOCH, EVERY = 2, 15, 4


def _logged_steps(path) -> list[int]:
    if not path.exists():
        return []
    with path.open() as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("step")]


def _kill_mid_epoch(command, cwd, out, timeout=240.0) -> int:
    """Start the run, SIGKILL it once a mid-epoch checkpoint exists and a step after it is logged; returns
    the last logged step at the kill."""
    process = subprocess.Popen(
        command, cwd=cwd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            steps = _logged_steps(out / "train_log.csv")
            # Past the first checkpoint (step 4) and not at an epoch's end: the kill lands inside epoch 0.
            if (out / "checkpoints" / "last.pt").exists() and steps and EVERY < steps[-1] < STEPS_PER_EPOCH - 1:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return steps[-1]
            if process.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        pytest.fail("no mid-epoch checkpoint appeared in time")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# Loader workers are a run-time setting: the killed run loads in a worker process (killed with it), the rerun
# in the main process, and both must reproduce the reference exactly.
def test_sigkill_mid_epoch_then_rerun_equals_the_uninterrupted_run(world, tmp_path, workers=1, workers_after=0):
    changes = {"distill": {"epochs": EPOCHS, "checkpoint_every": EVERY, "loader_workers": workers}}
    # Reference: the same settings, never interrupted (in-process, one thread like the subprocess).
    reference = tmp_path / "reference"
    Trainer(load(write_params(world, reference, changes))).train()

    run = tmp_path / "killed"
    params = write_params(world, run, changes)
    out = run / "out"
    killed_at = _kill_mid_epoch(dsmd_command(params, "distill"), run, out)
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert checkpoint["epoch"] == 0 and 0 < checkpoint["batch_in_epoch"] < STEPS_PER_EPOCH
    assert checkpoint["step"] <= killed_at

    again = dsmd_command(params, "--set", f"distill.loader_workers={workers_after}", "distill")
    finished = subprocess.run(again, cwd=run, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resuming {out / 'checkpoints' / 'last.pt'}" in finished.stderr.replace("\n", "")

    steps = _logged_steps(out / "train_log.csv")
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))  # no step twice, none missing
    mine, theirs = read_csv(out / "train_log.csv"), read_csv(reference / "out" / "train_log.csv")
    for a, b in zip(mine, theirs, strict=True):
        a.pop("samples_per_s"), b.pop("samples_per_s")
        assert a == b
    assert read_csv(out / "val_log.csv") == read_csv(reference / "out" / "val_log.csv")

    weights, expected = final_weights(out), final_weights(reference / "out")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def test_checkpoints_leave_the_run_unchanged(world, tmp_path):
    # Saves can come at any step (distill.checkpoint_minutes follows the clock), so a save must not move
    # anything a later step depends on: a run saving after every step equals one saving only at epoch ends.
    runs = {}
    for every in (0, 1):
        changes = {"distill": {"epochs": EPOCHS, "checkpoint_every": every, "loader_workers": 1}}
        Trainer(load(write_params(world, tmp_path / f"every-{every}", changes))).train()
        runs[every] = tmp_path / f"every-{every}" / "out"
    logs = [read_csv(runs[every] / "train_log.csv") for every in (0, 1)]
    for a, b in zip(*logs, strict=True):
        a.pop("samples_per_s"), b.pop("samples_per_s")
        assert a == b
    plain, saving = final_weights(runs[0]), final_weights(runs[1])
    for name, tensor in plain.items():
        assert torch.equal(saving[name], tensor), name
