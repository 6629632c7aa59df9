"""Feature store: write/read round trips on both backends, the writer's checks and the reader's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from store import FeatureStore, StoreError, open_store
from store.testing import fill, unit_rows

FP = "a" * 64
OTHER_FP = "b" * 64
N_IMAGES, N_CAPTIONS, DIM = 300, 1003, 24
PROVENANCE = {
    "teacher": {"name": "tiny", "checkpoint_sha256": "c" * 64, "tokenizer_sha256": "d" * 64, "max_text_len": 64},
    "image_preprocessing": {"size": 64, "resize": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
    "dataset": {"name": "toy", "fingerprint": FP},
    "dsmd_version": "0.1.0",
}
SKIPPED = {5: "truncated JPEG", 130: "missing file", 299: "CMYK decode failed"}

# dim 32: 128-row shards fill whole 4 KiB pages, so zarr shards are stitched into one view; dim 24: per shard.
READ_PATHS = [(".zarr", 24), (".zarr", 32), (".h5", 24)]


def assert_read_path(reader, suffix, dim):
    array = reader._array("tiny", "text")
    assert (array._stitched is not None) == (suffix == ".zarr" and dim == 32)


def make_store(path, *, dtype="float16", backend="auto", complete=True, dim=DIM):
    images, texts = unit_rows(N_IMAGES, dim, 1), unit_rows(N_CAPTIONS, dim, 2)
    with FeatureStore.create_or_open(
        path, backend=backend, dataset_fingerprint=FP, n_images=N_IMAGES, n_captions=N_CAPTIONS,
        rows_per_shard=128, rows_per_chunk=32, dataset_name="toy",
    ) as store:
        store.ensure_array("tiny", "image", dim, dtype=dtype, provenance=PROVENANCE)
        store.ensure_array("tiny", "text", dim, dtype=dtype, provenance=PROVENANCE)
        fill(store, "tiny", "image", images, SKIPPED)
        fill(store, "tiny", "text", texts, shards=None if complete else [0, 1, 3])
    return images, texts


def expected(values, dtype, skipped=()):
    out = values.astype(dtype).astype(np.float32)
    out[list(skipped)] = 0
    return out


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_any_order(tmp_path, suffix, dtype):
    path = tmp_path / f"features{suffix}"
    images, texts = make_store(path, dtype=dtype)
    rng = np.random.default_rng(0)
    with open_store(path, dataset_fingerprint=FP, teacher="tiny", dim=DIM) as reader:
        assert reader.backend == ("zarr" if suffix == ".zarr" else "hdf5")
        ids = rng.permutation(N_CAPTIONS)[:500]
        got = reader.get("tiny", "text", ids)
        assert got.dtype == np.float32 and got.shape == (500, DIM)
        tolerance = 1e-3 if dtype == "float16" else 0
        np.testing.assert_allclose(got, texts[ids], atol=tolerance)
        # Exactly the stored values, converted: nothing is lost beyond the dtype's rounding.
        assert np.array_equal(got, expected(texts, dtype)[ids])
        image_ids = rng.integers(0, N_IMAGES, 700)  # repeats included
        assert np.array_equal(reader.get("tiny", "image", image_ids), expected(images, dtype, SKIPPED)[image_ids])
        valid = reader.valid("tiny", "image")
        assert valid.sum() == N_IMAGES - len(SKIPPED) and not valid[list(SKIPPED)].any()
        assert reader.skipped("tiny", "image") == SKIPPED
        assert reader.provenance("tiny", "image") == PROVENANCE
        attrs = reader.attrs("tiny", "text")
        assert (attrs["dtype"], attrs["dim"], attrs["normalisation"]) == (dtype, DIM, "l2")
        assert reader.root["schema_version"] == 1 and reader.root["store_libs"]["zarr"]
        assert reader.dataset_name == "toy" and reader.teachers() == ["tiny"]
        native = reader.get("tiny", "text", ids, dtype=None)
        assert native.dtype == np.dtype(dtype)


@pytest.mark.parametrize(("suffix", "dim"), READ_PATHS)
def test_rows_are_memory_mapped_not_decoded(tmp_path, suffix, dim):
    path = tmp_path / f"features{suffix}"
    make_store(path, dim=dim)
    with open_store(path) as reader:
        assert_read_path(reader, suffix, dim)
        reader.get("tiny", "text", np.array([0, 500]))
        array = reader._array("tiny", "text")
        if array._stitched is not None:
            assert array._whole is array._stitched.array  # shard files mapped side by side
        else:
            mapped = array._whole if array._whole is not None else array.view(0)
            assert isinstance(mapped, np.memmap) or isinstance(mapped.base, np.memmap)


def test_in_memory_and_streaming(tmp_path):
    path = tmp_path / "features.zarr"
    images, texts = make_store(path)
    with open_store(path, teacher="tiny", in_memory=True) as reader:
        ids = np.random.default_rng(1).integers(0, N_CAPTIONS, 256)
        assert np.array_equal(reader.get("tiny", "text", ids), expected(texts, "float16")[ids])
        assert reader.nbytes() == (N_IMAGES + N_CAPTIONS) * DIM * 2
    with open_store(path) as reader:
        batches = list(reader.stream("tiny", "image", batch_size=50, shuffle_buffer=100, seed=3))
        ids = np.concatenate([b[0] for b in batches])
        assert sorted(ids.tolist()) == sorted(set(range(N_IMAGES)) - set(SKIPPED))  # valid rows, each once
        assert ids.tolist() != sorted(ids.tolist())  # shuffled
        for batch_ids, rows in batches:
            assert np.array_equal(rows, expected(images, "float16")[batch_ids])
        again = np.concatenate([b[0] for b in reader.stream("tiny", "image", 50, shuffle_buffer=100, seed=3)])
        assert np.array_equal(ids, again)  # the seed fixes the order
        ordered = list(reader.stream("tiny", "text", batch_size=100))
        assert [len(b[0]) for b in ordered] == [100] * 10 + [3]
        assert np.array_equal(np.concatenate([b[0] for b in ordered]), np.arange(N_CAPTIONS))


def test_shard_api(tmp_path):
    with FeatureStore.create_or_open(
        tmp_path / "s.zarr", dataset_fingerprint=FP, n_images=300, n_captions=1003, rows_per_shard=128,
        rows_per_chunk=32,
    ) as store:
        assert store.num_shards("image") == 3 and store.num_shards("caption") == 8
        assert store.num_shards("tiny/text") == 8 and store.num_shards("tiny", "pair") == 8
        assert store.shard_rows("tiny", "text", 7) == (896, 1003)
        store.ensure_array("tiny", "pair", 8)
        assert store.pending_shards("tiny", "pair") == list(range(8))
        assert not store.complete("tiny", "pair")
        with pytest.raises(StoreError, match="shards 0..7"):
            store.shard_rows("tiny", "text", 8)


def test_creation_is_idempotent_and_mismatch_refused(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path, complete=False)
    args = dict(dataset_fingerprint=FP, n_images=N_IMAGES, n_captions=N_CAPTIONS, rows_per_shard=128, rows_per_chunk=32)
    with FeatureStore.create_or_open(path, **args) as store:
        assert store.pending_shards("tiny", "text") == [2, 4, 5, 6, 7]
        store.ensure_array("tiny", "text", DIM, provenance={**PROVENANCE, "dsmd_version": "9.9", "host": "other"})
        with pytest.raises(StoreError, match="checkpoint_sha256"):
            changed = {**PROVENANCE, "teacher": {**PROVENANCE["teacher"], "checkpoint_sha256": "e" * 64}}
            store.ensure_array("tiny", "text", DIM, provenance=changed)
        with pytest.raises(StoreError, match="24-dimensional features, not 32"):
            store.ensure_array("tiny", "text", 32, provenance=PROVENANCE)
        with pytest.raises(StoreError, match="float16, not float32"):
            store.ensure_array("tiny", "text", DIM, dtype="float32", provenance=PROVENANCE)
    with pytest.raises(StoreError, match="rows_per_shard 128 \\(asked 256\\)"):
        FeatureStore.create_or_open(path, **{**args, "rows_per_shard": 256})
    with pytest.raises(StoreError, match="made for dataset 'toy'"):
        FeatureStore.create_or_open(path, **{**args, "dataset_fingerprint": OTHER_FP})
    with pytest.raises(StoreError, match="is an existing zarr store, not hdf5"):
        FeatureStore.create_or_open(path, backend="hdf5", **args)


def test_write_shard_checks_rows(tmp_path):
    store = FeatureStore.create_or_open(
        tmp_path / "s.zarr", dataset_fingerprint=FP, n_images=300, n_captions=10, rows_per_shard=100,
        rows_per_chunk=50,
    )
    store.ensure_array("tiny", "image", 8)
    rows = unit_rows(100, 8)
    with pytest.raises(StoreError, match=r"expected values of shape \(100, 8\)"):
        store.write_shard("tiny", "image", 1, rows[:99])
    bad = rows.copy()
    bad[7] = np.nan
    with pytest.raises(StoreError, match="row 107 is not finite"):
        store.write_shard("tiny", "image", 1, bad)
    bad = rows.copy()
    bad[3] *= 1.5
    with pytest.raises(StoreError, match=r"row 103 has norm 1\.49"):
        store.write_shard("tiny", "image", 1, bad)
    with pytest.raises(StoreError, match="skipped row 5 is not in this shard"):
        store.write_shard("tiny", "image", 1, rows, skipped={5: "x"})
    valid = np.ones(100, bool)
    with pytest.raises(StoreError, match="listed as skipped but marked valid"):
        store.write_shard("tiny", "image", 1, rows, valid=valid, skipped={110: "bad"})
    assert store.pending_shards("tiny", "image") == [0, 1, 2]  # nothing written by refused calls
    # Invalid rows may hold anything (NaN from a failed decode): they are stored as zeros.
    bad = rows.copy()
    bad[7] = np.nan
    valid[7] = False
    mark = store.write_shard("tiny", "image", 1, bad, valid=valid)
    assert mark.skipped == {107: "skipped (no reason given)"} and mark.valid_count == 99
    with pytest.raises(StoreError, match="already complete"):
        store.write_shard("tiny", "image", 1, rows)
    store.write_shard("tiny", "image", 1, rows, overwrite=True)
    store.close()
    with open_store(tmp_path / "s.zarr") as reader:
        assert np.array_equal(reader.get("tiny", "image", [107]), rows[[7]].astype(np.float16).astype(np.float32))


def test_reader_refuses_other_dataset_teacher_dimension(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    with pytest.raises(StoreError) as caught:
        open_store(path, dataset_fingerprint=OTHER_FP)
    message = str(caught.value)
    assert "made for dataset 'toy'" in message and FP in message and OTHER_FP in message
    with pytest.raises(StoreError, match=r"teacher\(s\) tiny, not 'beit3'"):
        open_store(path, teacher="beit3")
    with pytest.raises(StoreError, match="has no pair features"):
        open_store(path, teacher="tiny", kinds=("image", "pair"))
    with pytest.raises(StoreError, match="24-dimensional features, but 768"):
        open_store(path, teacher="tiny", dim=768)
    with pytest.raises(StoreError, match="no feature store there"):
        open_store(tmp_path / "missing.zarr")
    with open_store(path, dataset_fingerprint=FP, teacher=["tiny"], dim=DIM) as reader:
        with pytest.raises(StoreError, match="id 1003 is out of range"):
            reader.get("tiny", "text", [1, 1003])
        assert reader.get("tiny", "text", []).shape == (0, DIM)


@pytest.mark.parametrize(("suffix", "dim"), READ_PATHS)
def test_incomplete_shard_is_refused(tmp_path, suffix, dim):
    path = tmp_path / f"s{suffix}"
    _, texts = make_store(path, complete=False, dim=dim)
    with open_store(path, teacher="tiny") as reader:
        assert_read_path(reader, suffix, dim)
        assert np.array_equal(reader.get("tiny", "text", [0, 200, 400]), expected(texts, "float16")[[0, 200, 400]])
        with pytest.raises(StoreError) as caught:
            reader.get("tiny", "text", [0, 300])  # reading the unmapped slot would crash: it must be refused
        message = str(caught.value)
        assert "shard 2 (rows 256..383)" in message and "rerun dsmd extract to finish it" in message
        with pytest.raises(StoreError, match="not complete"):
            reader.valid("tiny", "text")
        partial = reader.valid("tiny", "text", allow_incomplete=True)
        assert partial[:256].all() and not partial[256:384].any()
        with pytest.raises(StoreError, match="not complete"):
            next(reader.stream("tiny", "text", 10))
        assert reader.pending_shards("tiny", "text") == [2, 4, 5, 6, 7]


@pytest.mark.parametrize("dim", [24, 32])
def test_reader_sees_shards_finished_after_it_opened(tmp_path, dim):
    path = tmp_path / "s.zarr"
    _, texts = make_store(path, complete=False, dim=dim)
    reader = open_store(path)
    with pytest.raises(StoreError):
        reader.get("tiny", "text", [300])
    assert_read_path(reader, ".zarr", dim)
    with FeatureStore.create_or_open(path, dataset_fingerprint=FP, n_images=N_IMAGES, n_captions=N_CAPTIONS,
                                     rows_per_shard=128, rows_per_chunk=32) as store:
        fill(store, "tiny", "text", texts)
    ids = np.array([300, 1002, 5, 300])
    assert np.array_equal(reader.get("tiny", "text", ids), expected(texts, "float16")[ids])
    assert_read_path(reader, ".zarr", dim)
    reader.close()


def test_several_teachers_and_pair_features(tmp_path):
    path = tmp_path / "mcad.zarr"
    args = dict(dataset_fingerprint=FP, n_images=40, n_captions=200, rows_per_shard=64, rows_per_chunk=16)
    with FeatureStore.create_or_open(path, **args) as store:
        for teacher, dim in (("dual", 16), ("joint", 12)):
            for kind in ("image", "text", "pair"):
                store.ensure_array(teacher, kind, dim, provenance={"teacher": teacher})
                fill(store, teacher, kind, unit_rows(store.layout.rows(kind), dim, seed=dim))
    with open_store(path, teacher=["dual", "joint"], kinds=("image", "text", "pair")) as reader:
        assert reader.shape("joint", "pair") == (200, 12) and reader.shape("dual", "image") == (40, 16)
        assert reader.teachers() == ["dual", "joint"]
