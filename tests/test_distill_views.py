"""distill.views: the student's image is the stored view's crop, and "replay" distils that view's teacher row,
"mismatch" the plain image's row, "plain" everything as without views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_helpers import FIXTURE, World, load, write_params

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")

K = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """The distill tests' shapes world (60 train images), its store with K views of the beit3 fixture."""
    from pipeline.data.canonical import prepare_dataset
    from stages.demo.shapes import generate_shapes
    from stages.extract.run import run_extract

    world = World(tmp_path_factory.mktemp("views-distill"))
    cfg = load(write_params(world, world.root / "build", {"extract": {"views": K}}))
    generate_shapes(cfg.demo)
    prepare_dataset(cfg.data)
    run_extract(cfg)
    return world


def _parts(world: World, mode: str, order: str = "random", epoch: int = 0):
    """(PairRows, collate) as a training epoch builds them, without loader workers."""
    from pipeline.data.canonical import CanonicalDataset
    from stages.distill.data import PairRows
    from stages.distill.methods import method_for

    cfg = load(write_params(world, world.root / f"run-{mode}", {"distill": {"views": mode, "view_order": order}}))
    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    method = method_for(cfg, ds, in_memory=False)
    pairs = method.train_pairs(*method.valid())
    tokenize = lambda texts: {"n": torch.tensor([len(t) for t in texts])}  # noqa: E731
    rows = PairRows(ds, pairs, _transform, views=method.view_plan(epoch))
    return ds, method, rows, method.collate(tokenize, workers=0)


def _transform(image):
    from pipeline.models.student import student_transform

    return student_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=True)(image)


def _batch(world, mode, order="random", epoch=0, n=12):
    ds, method, rows, collate = _parts(world, mode, order, epoch)
    items = [rows[i] for i in range(n)]
    return ds, method, items, collate(items)


def test_replay_carries_the_views_teacher_row_and_its_crop(world):
    from pipeline.data.images import load_rgb
    from pipeline.data.views import crop_view

    ds, method, items, batch = _batch(world, "replay")
    reader = method.reader
    views = batch.views.numpy()
    assert set(views.tolist()) <= set(range(K))
    all_rows = reader.get("beit3", "image_view", batch.image_ids.numpy()).reshape(len(views), K, -1)
    expected = all_rows[np.arange(len(views)), views]
    torch.testing.assert_close(batch.teacher_image, torch.from_numpy(expected), rtol=0, atol=0)
    plain = reader.get("beit3", "image", batch.image_ids.numpy())
    assert np.abs(batch.teacher_image.numpy() - plain).max() > 1e-2, "replay must not use the plain rows"
    # The student's pixels: the stored box cropped from the raw image, then the student's resize / normalise.
    boxes = reader.get("beit3", "image_view_box", batch.image_ids.numpy()).reshape(len(views), K, 4)
    for i in range(3):
        image = load_rgb(ds.image_path(int(batch.image_ids[i])))
        want = _transform(crop_view(image, boxes[i, views[i]]))
        torch.testing.assert_close(batch.pixels[i], want, rtol=0, atol=0)


def test_mismatch_crops_the_same_view_but_carries_the_plain_row(world):
    _, method, _, replay = _batch(world, "replay")
    _, _, _, mismatch = _batch(world, "mismatch")
    torch.testing.assert_close(mismatch.pixels, replay.pixels, rtol=0, atol=0)
    torch.testing.assert_close(mismatch.views, replay.views)
    plain = method.reader.get("beit3", "image", mismatch.image_ids.numpy())
    torch.testing.assert_close(mismatch.teacher_image, torch.from_numpy(plain), rtol=0, atol=0)
    torch.testing.assert_close(mismatch.teacher_text, replay.teacher_text, rtol=0, atol=0)


def test_off_is_the_plain_batch_of_before(world):
    """No views: the items and batch are those of PairRows / PairCollate built as before distill.views."""
    from pipeline.data.canonical import CanonicalDataset
    from stages.distill.data import PairCollate, PairRows

    ds, method, items, batch = _batch(world, "plain")
    assert batch.views is None and all(item[4] == -1 for item in items)
    before = PairRows(CanonicalDataset.load(world.canonical), method.train_pairs(*method.valid()), _transform)
    old = PairCollate(lambda texts: {"n": torch.tensor([len(t) for t in texts])}, lambda: method.reader, "beit3")
    reference = old([before[i] for i in range(12)])
    for name in ("image_ids", "caption_ids", "pixels", "teacher_image", "teacher_text"):
        torch.testing.assert_close(getattr(batch, name), getattr(reference, name), rtol=0, atol=0)


def test_view_order_cycle_and_random(world):
    from pipeline.data.views import choose_view

    _, _, items0, _ = _batch(world, "replay", "cycle", epoch=0)
    _, _, items1, _ = _batch(world, "replay", "cycle", epoch=1)
    assert [item[4] for item in items0] == [item[1] % K for item in items0]
    assert [item[4] for item in items1] == [(1 + item[1]) % K for item in items1]
    # random: from (seed, epoch, image id) alone; over epochs every view comes up.
    drawn = [choose_view("random", 0, epoch, 5, K) for epoch in range(40)]
    assert drawn == [choose_view("random", 0, epoch, 5, K) for epoch in range(40)]
    assert set(drawn) == set(range(K))
    assert drawn != [choose_view("random", 1, epoch, 5, K) for epoch in range(40)]


def test_a_short_replay_run_trains_and_the_report_shows_the_views(world, tmp_path):
    import json

    from pipeline.config import stage_config
    from stages.distill.train import Trainer
    from stages.evaluate.run import run_evaluate

    params = write_params(world, tmp_path, {
        "distill": {"views": "replay", "epochs": 1},
        "evaluate": {"out_dir": str(tmp_path / "evaluate"), "ablations": "", "examples": 0},
    })
    summary = Trainer(load(params)).train()
    assert summary["steps"] == 15 and np.isfinite(summary["best_val_rsum"])

    run_evaluate(stage_config(load(params), "evaluate"))
    teacher = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())["teacher"]
    assert teacher["views"] == K
    assert teacher["view_bytes_per_image"] == 64 * 2 + 16  # float16 row of the 64-wide fixture, float32 box
    assert teacher["views_extract_seconds"] > 0
    assert "teacher.views_extract_seconds" in (tmp_path / "evaluate" / "report.md").read_text()


def test_views_without_stored_views_is_a_one_line_error(world, tmp_path):
    from pipeline.errors import DsmdError
    from stages.distill.train import Trainer

    # The oracle teacher of distill_helpers is not in this store; beit3 has views, so take a store without.
    from stages.extract.run import run_extract

    plain = tmp_path / "plain.zarr"
    run_extract(load(write_params(world, tmp_path / "x", {"extract": {"store": str(plain)}})))
    params = write_params(world, tmp_path, {"extract": {"store": str(plain)}, "distill": {"views": "replay"}})
    with pytest.raises(DsmdError, match="extract.views=K > 0"):
        Trainer(load(params))
    supervised = write_params(world, tmp_path / "s", {"distill": {"views": "mismatch", "method": "supervised"}})
    with pytest.raises(DsmdError, match="distill.views=plain"):
        Trainer(load(supervised))


def test_mcad_batches_take_every_dual_teachers_view_rows(tmp_path):
    """MCAD under replay: each dual teacher's image rows are its rows of the items' views; the fused pair rows
    (not extracted per view) and the text rows stay as stored."""
    from stages.distill.mcad_data import McadCollate
    from store import FeatureStore, open_store

    n, dim, k = 4, 4, 2
    rng = np.random.default_rng(0)

    def unit(*shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    with FeatureStore.create_or_open(tmp_path / "s.zarr", dataset_fingerprint="f", n_images=n, n_captions=n,
                                     rows_per_shard=4, rows_per_chunk=4) as store:
        for name in ("a", "b"):
            for kind in ("image", "text"):
                store.ensure_array(name, kind, dim, dtype="float32")
                store.write_shard(name, kind, 0, unit(n, dim))
            store.ensure_array(name, "image_view", k * dim, dtype="float32", views=k)
            store.write_shard(name, "image_view", 0, unit(n, k, dim).reshape(n, k * dim))
        store.ensure_array("a", "pair", dim, dtype="float32")
        store.write_shard("a", "pair", 0, unit(n, dim))
    reader = open_store(tmp_path / "s.zarr")
    items = [(3, 2, torch.zeros(3, 4, 4), "x", 1), (0, 0, torch.zeros(3, 4, 4), "y", 0)]
    tokenize = lambda texts: {"n": torch.tensor([len(t) for t in texts])}  # noqa: E731
    replay = McadCollate(tokenize, lambda: reader, ["a", "b"], "a", views="replay")(items)
    mismatch = McadCollate(tokenize, lambda: reader, ["a", "b"], "a", views="mismatch")(items)
    for name in ("a", "b"):
        rows = reader.get(name, "image_view", [2, 0]).reshape(2, k, dim)
        np.testing.assert_array_equal(replay.teacher_image[name].numpy(), rows[[0, 1], [1, 0]])
        np.testing.assert_array_equal(mismatch.teacher_image[name].numpy(), reader.get(name, "image", [2, 0]))
        np.testing.assert_array_equal(replay.teacher_text[name].numpy(), reader.get(name, "text", [3, 0]))
    np.testing.assert_array_equal(replay.fused.numpy(), reader.get("a", "pair", [3, 0]))
    assert replay.views.tolist() == [1, 0] and replay.bad_rows == ()
    reader.close()


def test_store_in_ram_holds_the_replayed_view_rows_too(world, tmp_path):
    """distill.load_store_in_ram with replay: the view rows read from RAM in the trainer and in loader workers,
    shown by reading them after the store's files are gone."""
    import shutil

    from pipeline.data.canonical import CanonicalDataset
    from stages.distill.methods import method_for

    store = tmp_path / "copy.zarr"
    shutil.copytree(world.store, store)
    cfg = load(write_params(world, tmp_path, {"extract": {"store": str(store)},
                                              "distill": {"views": "replay", "load_store_in_ram": True}}))
    ds = CanonicalDataset.load(cfg.data.canonical_dir)
    method = method_for(cfg, ds, in_memory=True)
    worker_reader = method._worker_reader()()
    expected = method.reader.get("beit3", "image_view", [0, 5])
    shutil.rmtree(store)
    np.testing.assert_array_equal(method.reader.get("beit3", "image_view", [0, 5]), expected)
    np.testing.assert_array_equal(worker_reader.get("beit3", "image_view", [0, 5]), expected)
