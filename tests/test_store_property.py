"""Property: get() returns exactly the reference rows for any ids (any order, repeats, empty), every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import FeatureStore, open_store, stitch
from store.testing import fill, unit_rows

N, DIM = 517, 8  # partial last shards: 517 = 4 * 128 + 5 = 2 * 256 + 5
SKIPPED = {0: "bad", 200: "bad", 516: "bad"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    values = unit_rows(N, DIM, seed=5)
    reference = values.astype(np.float16)
    reference[list(SKIPPED)] = 0
    readers = {}
    # 128 rows x 8 x 2 bytes = 2 KiB: zarr shards read one by one; 256 rows: 4 KiB pages, stitched together.
    for suffix, rows_per_shard in ((".zarr", 128), (".h5", 128), (".zarr", 256)):
        path = root / f"s{rows_per_shard}{suffix}"
        with FeatureStore.create_or_open(path, dataset_fingerprint="p" * 64, n_images=N, n_captions=N,
                                         rows_per_shard=rows_per_shard, rows_per_chunk=32) as store:
            store.ensure_array("t", "image", DIM)
            fill(store, "t", "image", values, SKIPPED)
        readers[path.name] = open_store(path)
        readers[path.name + " in RAM"] = open_store(path, teacher="t", kinds=("image",), in_memory=True)
    stitched = [name for name, r in readers.items() if r._array("t", "image")._stitched is not None]
    assert stitched == ["s256.zarr"] or not stitch.supported(256, DIM, 2)
    yield reference, readers
    for reader in readers.values():
        reader.close()


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=N - 1), max_size=300), which=st.integers(0, 5))
def test_get_matches_numpy_reference(stores, ids, which):
    reference, readers = stores
    reader = list(readers.values())[which]
    ids = np.array(ids, dtype=np.int64)
    got = reader.get("t", "image", ids)
    assert got.dtype == np.float32 and got.shape == (len(ids), DIM)
    assert np.array_equal(got, reference[ids].astype(np.float32))
    native = reader.get("t", "image", ids.astype(np.int32), dtype=None)
    assert np.array_equal(native.view(np.uint16), reference[ids].view(np.uint16))


@settings(max_examples=30, deadline=None)
@given(start=st.integers(0, N - 1), length=st.integers(1, 400))
def test_get_contiguous_runs(stores, start, length):
    reference, readers = stores
    ids = np.arange(start, min(N, start + length))
    for reader in readers.values():
        assert np.array_equal(reader.get("t", "image", ids), reference[ids].astype(np.float32))
