"""MCAD alignment: the least-squares map on data with a known map, and store extras that keep it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import DsmdError
from stages.extract.align import fit_linear_map
from store import FeatureStore
from store.errors import StoreError
from store.extras import extras_dir, get_extra, has_extra, list_extras, put_extra


def chunks(x: np.ndarray, y: np.ndarray, size: int):
    for start in range(0, len(x), size):
        yield x[start : start + size], y[start : start + size]


def known_map(n=400, d_in=12, d_out=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in))
    w = rng.standard_normal((d_in, d_out))
    return x, w


def test_recovers_the_map_exactly_from_noiseless_data_in_any_chunking():
    x, w = known_map()
    for size in (len(x), 64, 7):
        fit = fit_linear_map(chunks(x, x @ w, size))
        np.testing.assert_allclose(fit.weight, w, atol=1e-9, rtol=0)
        assert fit.rows == len(x) and fit.rank == 12
        assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_close_with_noise():
    x, w = known_map(n=4000, seed=1)
    noise = 0.05 * np.random.default_rng(2).standard_normal((len(x), w.shape[1]))
    fit = fit_linear_map(chunks(x, x @ w + noise, 500))
    # Standard error per entry ~ 0.05 / sqrt(4000) ~ 8e-4.
    assert np.abs(fit.weight - w).max() < 5e-3
    assert 0.99 < fit.r2 < 1.0
    # Same answer as numpy's direct least squares.
    direct = np.linalg.lstsq(x, x @ w + noise, rcond=None)[0]
    np.testing.assert_allclose(fit.weight, direct, atol=1e-9)


def test_rank_deficient_inputs_give_the_minimum_norm_solution():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((200, 5))
    x = np.concatenate([base, base[:, :2]], axis=1)  # two duplicated columns: rank 5 of 7
    y = base @ rng.standard_normal((5, 3))
    fit = fit_linear_map(chunks(x, y, 50))
    assert fit.rank == 5
    np.testing.assert_allclose(x @ fit.weight, y, atol=1e-8)
    np.testing.assert_allclose(fit.weight, np.linalg.pinv(x) @ y, atol=1e-8)


def test_ridge_is_the_closed_form():
    x, w = known_map(n=100, seed=4)
    y = x @ w
    fit = fit_linear_map(chunks(x, y, 30), ridge=0.5)
    n = len(x)
    want = np.linalg.solve(x.T @ x / n + 0.5 * np.eye(x.shape[1]), x.T @ y / n)
    np.testing.assert_allclose(fit.weight, want, atol=1e-10)
    assert np.linalg.norm(fit.weight) < np.linalg.norm(w)


def test_fit_errors():
    with pytest.raises(DsmdError, match="no rows"):
        fit_linear_map(iter(()))
    with pytest.raises(DsmdError, match="row-aligned"):
        fit_linear_map([(np.ones((3, 2)), np.ones((2, 2)))])
    with pytest.raises(DsmdError, match="align_ridge"):
        fit_linear_map([(np.ones((3, 2)), np.ones((3, 2)))], ridge=-1.0)


# ------------------------------------------------------------------------------------------- store extras


def make_store(path, backend="zarr"):
    with FeatureStore.create_or_open(path, backend=backend, dataset_fingerprint="fp", n_images=4, n_captions=8,
                                     rows_per_shard=4, rows_per_chunk=2):
        pass
    return path


@pytest.mark.parametrize("backend,name", [("zarr", "s.zarr"), ("hdf5", "s.h5")])
def test_extras_round_trip(tmp_path, backend, name):
    path = make_store(tmp_path / name, backend)
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    put_extra(path, "mcad-align--a--b", value, dataset_fingerprint="fp", provenance={"rows": 3, "r2": 0.5})
    assert has_extra(path, "mcad-align--a--b") and list_extras(path) == ["mcad-align--a--b"]
    extra = get_extra(path, "mcad-align--a--b", dataset_fingerprint="fp")
    np.testing.assert_array_equal(extra.value, value)
    assert extra.value.dtype == np.float32 and extra.provenance == {"rows": 3, "r2": 0.5}
    expected_dir = path / "_extras" if backend == "zarr" else tmp_path / (name + ".extras")
    assert extras_dir(path) == expected_dir and (expected_dir / "mcad-align--a--b.npz").is_file()
    # Replacing keeps one file with the new content.
    put_extra(path, "mcad-align--a--b", value * 2, dataset_fingerprint="fp")
    np.testing.assert_array_equal(get_extra(path, "mcad-align--a--b").value, value * 2)
    if backend == "zarr":  # the store still opens and lists only its arrays
        from store import open_store

        with open_store(path) as reader:
            assert reader.arrays() == []


def test_extras_refusals(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="no feature store"):
        put_extra(tmp_path / "missing.zarr", "x", np.ones(2), dataset_fingerprint="fp")
    with pytest.raises(StoreError, match="not usable"):
        put_extra(path, "../escape", np.ones(2), dataset_fingerprint="fp")
    with pytest.raises(StoreError, match="NaN"):
        put_extra(path, "x", np.array([np.nan]), dataset_fingerprint="fp")
    with pytest.raises(StoreError, match="JSON"):
        put_extra(path, "x", np.ones(2), dataset_fingerprint="fp", provenance={"bad": object()})
    with pytest.raises(StoreError, match=r"no extra 'x'.*present: none"):
        get_extra(path, "x")
    put_extra(path, "x", np.ones(2), dataset_fingerprint="fp")
    with pytest.raises(StoreError, match="another|fingerprint"):
        get_extra(path, "x", dataset_fingerprint="other")
    target = extras_dir(path) / "x.npz"
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(StoreError, match="cannot read"):
        get_extra(path, "x")
