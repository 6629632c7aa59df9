"""`dsmd extract` against damaged stores, full disks and a second run: --repair redoes exactly the damaged shards."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from extract_helpers import DSMD, FIXTURE, TEACHER, build_world, config, write_params

from store import open_store
from store.errors import StoreBusyError, StoreCorruptError, StoreDiskFullError, StoreError
from store.verify import verify_store

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 16 images (2 image shards of 8 rows), 48 captions (6 text shards)
    return build_world(tmp_path_factory.mktemp("world"), n_train=12, n_val=0, n_test=4)


def shard_file(store, kind, shard):
    return store / TEACHER / kind / "c" / str(shard) / "0"


def snapshot(store):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((store / TEACHER).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_repair_redoes_exactly_the_shards_verify_flags(world, tmp_path):
    from stages.extract.run import run_extract

    cfg = config(world, tmp_path / "run")
    run_extract(cfg)
    store = pathlib.Path(cfg.extract.store)
    before = snapshot(store)
    dim = open_store(store).dim(TEACHER, "image")

    # A NaN teacher row in image shard 1, a truncated text shard 2, one flipped bit in text shard 4.
    rows = np.memmap(shard_file(store, "image", 1), dtype="<f2", mode="r+", shape=(8, dim))
    rows[3, 0] = np.nan
    rows.flush()
    del rows
    truncated = shard_file(store, "text", 2)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with open(shard_file(store, "text", 4), "r+b") as handle:
        handle.seek(6)
        byte = handle.read(1)[0]
        handle.seek(6)
        handle.write(bytes([byte ^ 1]))
    damaged = {(TEACHER, "image", 1), (TEACHER, "text", 2), (TEACHER, "text", 4)}
    report = verify_store(store)
    assert {(d.teacher, d.kind, d.shard) for d in report.damaged} == damaged
    assert all(d.marked and d.file == shard_file(store, d.kind, d.shard) for d in report.damaged)

    # What distill and evaluate do: open the store and read rows. The damage is one line naming the file.
    with open_store(store, teacher=TEACHER) as reader:
        with pytest.raises(StoreCorruptError) as caught:
            reader.get(TEACHER, "text", np.arange(48))
    assert "\n" not in str(caught.value)
    assert f"{truncated}: {TEACHER}/text rows 16..23" in str(caught.value) and "dsmd extract --repair" in str(
        caught.value)

    assert run_extract(cfg).shards_written == 0  # a plain run trusts the completion marks
    summary = run_extract(cfg, repair=True)
    assert summary.shards_written == 3 and summary.shards_already_done == 8 - 3
    assert any("--repair: redoing 3 damaged shard(s)" in note for note in summary.notes)
    assert verify_store(store).ok
    after = snapshot(store)
    redone = {shard_file(store, kind, shard) for _, kind, shard in damaged}
    redone |= {store / TEACHER / kind / "marks" / f"shard-{shard:06d}.json" for _, kind, shard in damaged}
    assert sorted(p for p in before if before[p] != after[p]) == sorted(redone)  # nothing else was touched
    for file in {shard_file(store, kind, shard) for _, kind, shard in damaged}:
        assert after[file][0] == before[file][0]  # the teacher wrote the same rows again

    assert run_extract(cfg, repair=True).shards_written == 0  # nothing left to repair


def test_a_full_disk_stops_extract_in_one_line_and_the_rerun_resumes(world, tmp_path, monkeypatch):
    from stages.extract.run import run_extract

    cfg = config(world, tmp_path / "run")
    store = pathlib.Path(cfg.extract.store)
    real_open = pathlib.Path.open

    def open_on_a_full_disk(self, mode="r", *args, **kwargs):
        if "w" in mode and "text/c/3/0" in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_open(self, mode, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "open", open_on_a_full_disk)
        with pytest.raises(StoreDiskFullError) as caught:
            run_extract(cfg)
    assert str(caught.value) == (f"no space left on device writing {shard_file(store, 'text', 3)}; free space and "
                                 "rerun: finished shards are kept")
    assert not [p for p in store.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]
    summary = run_extract(cfg)
    assert summary.shards_written == 6 - 3 and verify_store(store).ok  # image shards and text 0..2 were kept


HOLDER = """
import sys, time
from pathlib import Path
from store.backends import writer_lease
with writer_lease(Path(sys.argv[1]), "dsmd extract"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_extract_is_told_another_is_running(world, tmp_path):
    params = write_params(world, tmp_path / "run")
    store = tmp_path / "run" / "features.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([*DSMD, "--params", str(params), "extract"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())  # undo the console's line wrapping
    assert f"another `dsmd extract` is running on {store} (pid {holder.pid} on host" in message
    assert "wait for it to finish (or stop it), then run `dsmd extract` again" in message


def test_replace_stale_refuses_a_folder_that_is_not_a_store(world, tmp_path):
    from stages.extract.run import run_extract

    cfg = config(world, tmp_path / "run")
    folder = pathlib.Path(cfg.extract.store)
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("not features")
    with pytest.raises(StoreError, match=f"{folder} holds thesis.tex but is not a dsmd feature store"):
        run_extract(cfg, replace_stale=True)
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


def test_extract_in_process_holds_the_store(world, tmp_path, monkeypatch):
    """While one extract runs, a second one (here: inside the first's teacher loop) is refused."""
    from stages.extract import run as run_module

    cfg = config(world, tmp_path / "run")
    seen = []
    real_run_local = run_module._run_local

    def run_local_and_try_another(cfg, lease):
        with pytest.raises(StoreBusyError, match="another `dsmd extract` is running on"):
            run_module.run_extract(cfg)
        seen.append(True)
        return real_run_local(cfg, lease)

    monkeypatch.setattr(run_module, "_run_local", run_local_and_try_another)
    run_module.run_extract(cfg)
    assert seen == [True]
