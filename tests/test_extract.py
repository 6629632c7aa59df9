"""dsmd extract in-process: resume after SIGKILL, bad and missing images, extract.splits, CLI errors.

Determinism: the fixture teacher runs on the CPU in fp32 with one thread, and a shard's batches depend on the
shard alone, so two extractions of the same shards give bit-identical float16 rows (compared exactly).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import (
    DSMD,
    FIXTURE,
    TEACHER,
    assert_same_contents,
    build_world,
    config,
    marks,
    read_store,
    write_params,
)

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")

N_IMAGES, N_CAPTIONS = 36, 108
SHARDS = 5 + 14  # 36 images and 108 captions in shards of 8 rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("extract-world"))


@pytest.fixture(scope="module")
def reference_store(world, tmp_path_factory) -> Path:
    """An uninterrupted in-process extraction of the whole world."""
    from stages.extract.run import run_extract

    run_dir = tmp_path_factory.mktemp("reference")
    summary = run_extract(config(world, run_dir))
    assert summary.shards_written == SHARDS and summary.rows_encoded == N_IMAGES + N_CAPTIONS
    return run_dir / "features.zarr"


@pytest.fixture(scope="module")
def reference(world, reference_store):
    return read_store(reference_store, world.canonical)


def test_reference_rows_are_the_teachers_embeddings(world, reference):
    """The store holds what the teacher gives for each image and caption, in row order."""
    import torch

    from pipeline.config import load_config
    from pipeline.data.canonical import CanonicalDataset
    from pipeline.data.images import load_rgb
    from pipeline.models.teachers import load_teacher

    cfg = load_config(write_params(world, world.root / "direct"))
    teacher = load_teacher(cfg.teacher, device="cpu", precision="fp32")
    ds = CanonicalDataset.load(world.canonical)
    ids = [0, 17, 35]
    pixels = torch.stack([teacher.image_transform(load_rgb(ds.image_path(i))) for i in ids])
    images = teacher.encode_images(pixels).numpy()
    texts = teacher.encode_texts(teacher.tokenize(ds.texts([0, 50, 107]))).numpy()
    np.testing.assert_allclose(reference.rows["image"][ids].astype(np.float32), images, atol=2e-3)
    np.testing.assert_allclose(reference.rows["text"][[0, 50, 107]].astype(np.float32), texts, atol=2e-3)
    assert reference.valid["image"].all() and reference.valid["text"].all()
    assert reference.skipped == {"image": {}, "text": {}}


def test_resume_after_sigkill_gives_the_same_store(world, reference, tmp_path):
    from stages.extract.run import run_extract

    params = write_params(world, tmp_path)
    store = tmp_path / "features.zarr"
    log = (tmp_path / "out.log").open("wb")
    process = subprocess.Popen([*DSMD, "--params", str(params), "extract"], cwd=tmp_path, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not marks(store) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "out.log").read_text()
    before = marks(store)
    assert 1 <= len(before) < SHARDS

    summary = run_extract(config(world, tmp_path))

    assert summary.shards_already_done == len(before)
    assert summary.shards_written == SHARDS - len(before)
    after = marks(store)
    assert set(after) == {("image", s) for s in range(5)} | {("text", s) for s in range(14)}
    assert {key: after[key] for key in before} == before, "a finished shard was written again"
    assert_same_contents(read_store(store, world.canonical), reference)


def test_rerun_of_a_complete_store_writes_nothing(world, tmp_path):
    from stages.extract.run import run_extract

    cfg = config(world, tmp_path, rows_per_shard=64)
    run_extract(cfg)
    before = marks(tmp_path / "features.zarr")
    summary = run_extract(cfg)
    assert (summary.shards_written, summary.shards_already_done, summary.rows_encoded) == (0, len(before), 0)
    assert marks(tmp_path / "features.zarr") == before


@pytest.fixture(scope="module")
def broken_world(tmp_path_factory):
    """A world whose image 1 is garbage bytes, image 2 a truncated JPEG and image 3 missing."""
    from data_helpers import write_truncated_jpeg

    world = build_world(tmp_path_factory.mktemp("broken-world"), n_train=6, n_val=1, n_test=1, captions_per_image=2)
    (world.images / "000001.png").write_bytes(b"this is not an image at all" * 20)
    write_truncated_jpeg(world.images / "000002.png")
    (world.images / "000003.png").unlink()
    return world


BROKEN = {1: "not an image file (unknown or corrupt format)", 2: "truncated image data", 3: "missing file"}


@pytest.mark.parametrize("checked_first", [False, True], ids=["no-check", "after-check"])
def test_bad_and_missing_images_are_recorded_and_their_captions_kept(broken_world, tmp_path, capsys,
                                                                     checked_first):
    from pipeline.data.canonical import BAD_IMAGES_FILE, CanonicalDataset
    from pipeline.data.check import check_dataset
    from stages.extract.run import run_extract

    world = broken_world
    (world.canonical / BAD_IMAGES_FILE).unlink(missing_ok=True)
    if checked_first:
        report = check_dataset(CanonicalDataset.load(world.canonical), workers=1, progress=False)
        assert {b.image_id: b.reason for b in report.bad_images} == BROKEN

    summary = run_extract(config(world, tmp_path, rows_per_shard=8))

    assert summary.skipped == BROKEN
    printed = capsys.readouterr().err
    for image_id, reason in BROKEN.items():
        assert f"skipped image {image_id}: {reason}" in printed
    contents = read_store(tmp_path / "features.zarr", world.canonical)
    assert contents.skipped["image"] == BROKEN
    assert contents.valid["image"].tolist() == [i not in BROKEN for i in range(8)]
    assert not contents.rows["image"][[1, 2, 3]].any()
    norms = np.linalg.norm(contents.rows["image"][[0, 4, 5, 6, 7]].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    # Text rows do not depend on the image: the captions of the bad images are encoded like any other.
    assert contents.valid["text"].all() and contents.skipped["text"] == {}


def test_splits_left_out_are_recorded_then_added_by_a_wider_run(world, reference, tmp_path):
    """extract.splits=[test] leaves the other rows invalid with a reason (shards without a test row are complete
    and all invalid); a later run with every split rewrites exactly the shards holding such rows; a narrower
    run afterwards changes nothing."""
    from pipeline.data.canonical import CanonicalDataset
    from stages.extract.plan import UNSELECTED
    from stages.extract.run import run_extract

    ds = CanonicalDataset.load(world.canonical)
    store = tmp_path / "features.zarr"
    first = run_extract(config(world, tmp_path, splits=["test"]))
    assert first.shards_written == SHARDS
    part = read_store(store, world.canonical)
    for kind, test_rows in (("image", ds.image_ids("test")), ("text", ds.caption_ids("test"))):
        left_out = sorted(set(range(len(part.valid[kind]))) - set(test_rows.tolist()))
        assert first.unselected[kind] == len(left_out)
        assert part.skipped[kind] == dict.fromkeys(left_out, UNSELECTED)
        assert part.valid[kind].tolist() == [i in set(test_rows.tolist()) for i in range(len(part.valid[kind]))]
        assert not part.rows[kind][left_out].any()
        np.testing.assert_array_equal(part.rows[kind][test_rows], reference.rows[kind][test_rows])
    # Shards of 8 rows: images 0..23 train, 24..27 val, 28..35 test; captions 0..71, 72..83, 84..107.
    only_test = {("image", 4), ("text", 11), ("text", 12), ("text", 13)}
    kept = {key: mark for key, mark in marks(store).items() if key in only_test}

    wider = run_extract(config(world, tmp_path))
    assert (wider.shards_written, wider.shards_redone, wider.shards_already_done) == (SHARDS - 4, SHARDS - 4, 4)
    assert wider.rows_encoded == N_IMAGES + N_CAPTIONS - (36 - 32) - (108 - 88)
    assert wider.unselected == {"image": 0, "text": 0}
    assert {key: mark for key, mark in marks(store).items() if key in only_test} == kept
    full = read_store(store, world.canonical)
    assert_same_contents(full, reference)

    narrower = run_extract(config(world, tmp_path, splits=["val"]))
    assert narrower.shards_written == 0
    assert_same_contents(read_store(store, world.canonical), full)


def test_unknown_split_is_refused(world, tmp_path):
    from pipeline.errors import DsmdError
    from stages.extract.run import run_extract

    with pytest.raises(DsmdError, match=r"extract.splits .*'tset' is not a split"):
        run_extract(config(world, tmp_path, splits=["tset"]))


def test_cli_without_a_canonical_dataset_says_so_in_one_line(world, tmp_path):
    params = write_params(world, tmp_path)
    text = params.read_text().replace(str(world.canonical), str(tmp_path / "nowhere"))
    params.write_text(text)
    done = subprocess.run([*DSMD, "--params", str(params), "extract"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no canonical dataset in" in lines[0] and "nowhere" in lines[0] and "dsmd data prepare" in lines[0]
    assert not (tmp_path / "features.zarr").exists()


def test_store_is_keyed_by_teacher_name_with_its_provenance(world, reference_store):
    from pipeline.data.canonical import CanonicalDataset
    from store import open_store

    ds = CanonicalDataset.load(world.canonical)
    with open_store(reference_store, dataset_fingerprint=ds.fingerprint, teacher=TEACHER) as reader:
        assert reader.teachers() == [TEACHER]
        provenance = reader.provenance(TEACHER, "image")
    assert provenance["teacher"]["teacher"] == TEACHER and provenance["extraction"]["precision"] == "fp32"
    assert "splits" not in provenance["extraction"]


def test_settings_that_cannot_work_are_refused_before_any_work(world, tmp_path):
    from pipeline.errors import DsmdError
    from stages.extract.run import run_extract

    with pytest.raises(DsmdError, match="HDF5 store takes one writer"):
        run_extract(config(world, tmp_path, dask_workers=2, backend="hdf5"))
    # The schema's range refuses it as the settings are read.
    with pytest.raises(DsmdError, match=r"extract\.dask_workers: -1 is out of range; it must be >= 0"):
        run_extract(config(world, tmp_path, dask_workers=-1))
    assert not (tmp_path / "features.zarr").exists()


def test_cpu_threads_share_the_cores(monkeypatch):
    from stages.extract import worker

    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert worker.cpu_threads(0, loader_workers=2) == 14
    assert worker.cpu_threads(0, loader_workers=2, processes_on_host=4) == 2
    assert worker.cpu_threads(0, loader_workers=8, processes_on_host=4) == 1
    assert worker.cpu_threads(3, loader_workers=8) == 3
