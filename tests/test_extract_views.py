"""extract.views: K teacher views per training image, stored with their crop boxes.

Replaying a stored box on the raw image gives the teacher's input again (its embedding equals the stored row
to float16 precision); boxes depend on (seed, image id, view) alone, so a rerun and a 2-worker Dask run write
the same arrays; a killed view extraction resumes; views=0 writes nothing new.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from extract_helpers import DSMD, FIXTURE, TEACHER, build_world, config, write_params

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")

K = 3
N_IMAGES, N_TRAIN = 16, 12  # 12 train, 2 val, 2 test images, 2 captions each


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("views-world"), n_train=12, n_val=2, n_test=2, captions_per_image=2)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted in-process extraction with K views, shards of 4 rows (4 view shards)."""
    from stages.extract.run import run_extract

    run_dir = tmp_path_factory.mktemp("views-reference")
    summary = run_extract(config(world, run_dir, views=K, rows_per_shard=4, rows_per_chunk=4))
    assert summary.views == K and summary.shards_written == 4 + 8 + 4
    return run_dir / "features.zarr"


def view_arrays(store, teacher: str = TEACHER) -> dict[str, np.ndarray]:
    from store import open_store

    with open_store(store) as reader:
        ids = np.arange(N_IMAGES)
        return {
            "image": reader.get(teacher, "image", ids, dtype=None),
            "rows": reader.get(teacher, "image_view", ids, dtype=None),
            "boxes": reader.get(teacher, "image_view_box", ids, dtype=None),
            "valid": reader.valid(teacher, "image_view"),
            "skipped": reader.skipped(teacher, "image_view"),
        }


def assert_same_views(a: dict, b: dict) -> None:
    for key in ("image", "rows", "boxes", "valid"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differ")
    assert a["skipped"] == b["skipped"]


def view_marks(store) -> dict[tuple[str, int], str]:
    found = {}
    for kind in ("image_view", "image_view_box"):
        for path in sorted((store / TEACHER / kind / "marks").glob("shard-*.json")):
            found[(kind, int(path.stem.split("-")[1]))] = path.read_text()
    return found


def test_replaying_a_stored_view_gives_the_stored_teacher_row(world, reference):
    import torch

    from pipeline.data.canonical import CanonicalDataset
    from pipeline.data.images import load_rgb
    from pipeline.data.views import crop_view
    from pipeline.models.teachers import load_teacher

    cfg = config(world, world.root / "direct")
    teacher = load_teacher(cfg.teacher, device="cpu", precision="fp32")
    ds = CanonicalDataset.load(world.canonical)
    stored = view_arrays(reference)
    rows = stored["rows"].reshape(N_IMAGES, K, -1).astype(np.float32)
    boxes = stored["boxes"].reshape(N_IMAGES, K, 4)
    train = ds.image_ids("train")
    assert len(train) == N_TRAIN and stored["valid"][train].all()
    for image_id in train[[0, 5, 11]]:
        image = load_rgb(ds.image_path(int(image_id)))
        # Integer boxes inside the image, not all the whole image, different per view.
        assert (boxes[image_id] == np.round(boxes[image_id])).all()
        assert (boxes[image_id][:, 2] <= image.width).all() and (boxes[image_id][:, 3] <= image.height).all()
        assert len({tuple(b) for b in boxes[image_id].tolist()}) == K
        pixels = torch.stack([teacher.image_transform(crop_view(image, box)) for box in boxes[image_id]])
        again = teacher.encode_images(pixels).numpy()
        np.testing.assert_allclose(rows[image_id], again, atol=2e-3)  # float16 keeps ~3 decimal digits
        # ... and a view is not the plain image: its row differs from the plain one.
        assert np.abs(rows[image_id] - stored["image"][image_id].astype(np.float32)).max() > 1e-2
    # val and test images keep their plain features only.
    others = np.concatenate([ds.image_ids("val"), ds.image_ids("test")])
    assert not stored["valid"][others].any() and (stored["rows"][others] == 0).all()
    assert {stored["skipped"][int(i)] for i in others} == {"views are made for training images only"}


def test_boxes_depend_on_seed_image_and_view_only(world, reference):
    from pipeline.data.canonical import CanonicalDataset
    from pipeline.data.images import load_rgb
    from pipeline.data.views import draw_boxes

    ds = CanonicalDataset.load(world.canonical)
    boxes = view_arrays(reference)["boxes"].reshape(N_IMAGES, K, 4)
    for image_id in ds.image_ids("train"):
        image = load_rgb(ds.image_path(int(image_id)))
        np.testing.assert_array_equal(boxes[image_id], draw_boxes(0, int(image_id), K, image.width, image.height, 0.4))
    # Fewer views are the first views of more; another seed draws other boxes.
    np.testing.assert_array_equal(draw_boxes(0, 7, 2, 64, 48, 0.4), draw_boxes(0, 7, 5, 64, 48, 0.4)[:2])
    assert not np.array_equal(draw_boxes(0, 7, 3, 64, 48, 0.4), draw_boxes(1, 7, 3, 64, 48, 0.4))
    area = np.prod(draw_boxes(0, 3, 200, 64, 48, 0.4)[:, 2:] - draw_boxes(0, 3, 200, 64, 48, 0.4)[:, :2], axis=1)
    assert area.min() >= 0.4 * 64 * 48 * 0.97 and area.max() <= 64 * 48


def test_a_rerun_and_two_dask_workers_write_the_same_views(world, reference, tmp_path):
    from stages.extract.run import run_extract

    again = tmp_path / "again"
    run_extract(config(world, again, views=K, rows_per_shard=4, rows_per_chunk=4))
    assert_same_views(view_arrays(again / "features.zarr"), view_arrays(reference))

    dask_dir = tmp_path / "dask"
    summary = run_extract(config(world, dask_dir, views=K, rows_per_shard=4, rows_per_chunk=4, dask_workers=2,
                                 loader_workers=1))
    assert summary.workers == 2
    assert_same_views(view_arrays(dask_dir / "features.zarr"), view_arrays(reference))


def test_a_killed_view_extraction_resumes(world, reference, tmp_path):
    """SIGKILL once the first view shard is marked; the rerun writes only the rest and matches the reference."""
    from stages.extract.run import run_extract

    params = write_params(world, tmp_path, views=K, rows_per_shard=4, rows_per_chunk=4)
    store = tmp_path / "features.zarr"
    log = (tmp_path / "out.log").open("wb")
    process = subprocess.Popen([*DSMD, "--params", str(params), "extract"], cwd=tmp_path, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while (not any(kind == "image_view" for kind, _ in view_marks(store)) and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "out.log").read_text()
    before = view_marks(store)
    done = {shard for kind, shard in before if kind == "image_view"}
    assert 1 <= len(done) < 4

    summary = run_extract(config(world, tmp_path, views=K, rows_per_shard=4, rows_per_chunk=4))

    assert summary.shards_written == 4 - len(done)
    after = view_marks(store)
    assert {key: after[key] for key in before if key[0] == "image_view"} == {
        key: text for key, text in before.items() if key[0] == "image_view"
    }, "a finished view shard was written again"
    assert_same_views(view_arrays(store), view_arrays(reference))


def test_boxes_written_but_rows_not_are_redone(world, reference, tmp_path):
    """A kill between a shard's boxes and its rows: the shard is pending and is written again whole."""
    from stages.extract.run import run_extract
    from store import FeatureStore

    cfg = config(world, tmp_path, views=K, rows_per_shard=4, rows_per_chunk=4)
    run_extract(cfg)
    from pipeline.data.canonical import CanonicalDataset
    from stages.extract.plan import open_store

    with open_store(cfg, CanonicalDataset.load(world.canonical)) as store:
        assert isinstance(store, FeatureStore)
        store.drop_shards(TEACHER, "image_view", [2])
    summary = run_extract(cfg)
    assert summary.shards_written == 1
    assert_same_views(view_arrays(tmp_path / "features.zarr"), view_arrays(reference))


def test_views_zero_writes_no_new_array_and_the_same_plain_rows(world, reference, tmp_path):
    from stages.extract.run import run_extract
    from store import open_store

    run_extract(config(world, tmp_path, rows_per_shard=4, rows_per_chunk=4))
    with open_store(tmp_path / "features.zarr") as plain, open_store(reference) as with_views:
        assert sorted(plain.arrays()) == [(TEACHER, "image"), (TEACHER, "text")]
        for kind in ("image", "text"):
            assert {s: m.data_sha256 for s, m in plain.marks(TEACHER, kind).items()} == {
                s: m.data_sha256 for s, m in with_views.marks(TEACHER, kind).items()
            }
            assert plain.attrs(TEACHER, kind)["provenance"] == with_views.attrs(TEACHER, kind)["provenance"]


def test_store_info_shows_k_storage_per_view_and_time(reference):
    from store.info import store_info

    views = store_info(reference)["views"][TEACHER]
    dim = 64  # the fixture teacher's width
    assert views["views"] == K and views["valid_images"] == N_TRAIN
    assert views["bytes_per_view"] == dim * 2 + 4 * 4  # a float16 row and a float32 box
    assert views["bytes_total"] == N_IMAGES * K * (dim * 2 + 16)
    assert views["extract_seconds"] > 0


def test_other_view_settings_are_another_store(world, reference, tmp_path):
    from stages.extract.run import run_extract
    from store.errors import StoreMismatchError

    cfg = config(world, tmp_path, views=K, rows_per_shard=4, rows_per_chunk=4)
    run_extract(cfg)
    with pytest.raises(StoreMismatchError, match="views"):
        run_extract(config(world, tmp_path, views=K, rows_per_shard=4, rows_per_chunk=4, view_seed=5))
