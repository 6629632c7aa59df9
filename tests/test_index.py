"""Search indexes: exact numpy search against a full sort, FAISS against exact, plans, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import DsmdError
from pipeline.retrieval.index import ExactIndex, build_index, load_index, plan_index, time_search

faiss = pytest.importorskip("faiss")


def unit_vectors(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def full_sort_top_k(gallery, queries, k):
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("scratch_mb, gallery_block", [(256, 1 << 16), (0.001, 7), (0.01, 50)])
def test_exact_matches_full_sort(scratch_mb, gallery_block):
    rng = np.random.default_rng(0)
    gallery, queries = unit_vectors(rng, 300, 16), unit_vectors(rng, 25, 16)
    index = ExactIndex(gallery, scratch_mb=scratch_mb, gallery_block=gallery_block)
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = full_sort_top_k(gallery, queries, 10)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_exact_ties_and_ids():
    gallery = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    index = ExactIndex(gallery, ids=np.array([40, 41, 42, 43]), gallery_block=2)
    scores, ids = index.search(np.array([1.0, 0.0]), 3)
    # Equal scores come in gallery order; results carry the caller's ids.
    np.testing.assert_array_equal(ids, [[40, 42, 43]])
    np.testing.assert_allclose(scores, [[1.0, 1.0, 0.6]])
    # k beyond the gallery returns the whole gallery.
    scores, ids = index.search(np.array([[0.0, 1.0]]), 10)
    np.testing.assert_array_equal(ids, [[41, 43, 40, 42]])


def test_float16_storage_agrees():
    rng = np.random.default_rng(1)
    gallery, queries = unit_vectors(rng, 500, 32), unit_vectors(rng, 10, 32)
    index = build_index(gallery, kind="exact", memory_budget_mb=500 * 32 * 3 / 2**20)
    assert index.vectors.dtype == np.float16
    scores, _ = index.search(queries, 5)
    want_scores, _ = full_sort_top_k(gallery, queries, 5)
    np.testing.assert_allclose(scores, want_scores, atol=2e-3)


def test_faiss_flat_agrees_with_exact():
    rng = np.random.default_rng(2)
    gallery, queries = unit_vectors(rng, 2000, 64), unit_vectors(rng, 50, 64)
    exact = build_index(gallery, kind="exact")
    flat = build_index(gallery, kind="faiss")
    assert flat.backend == "faiss-flat"
    exact_scores, exact_ids = exact.search(queries, 20)
    flat_scores, flat_ids = flat.search(queries, 20)
    np.testing.assert_array_equal(flat_ids, exact_ids)
    np.testing.assert_allclose(flat_scores, exact_scores, atol=1e-5)


def test_ivf_scanning_every_list_is_exact():
    rng = np.random.default_rng(3)
    gallery, queries = unit_vectors(rng, 3000, 16), unit_vectors(rng, 20, 16)
    ivf = build_index(gallery, backend="faiss-ivf")
    assert ivf.backend == "faiss-ivf" and 1 <= ivf.nprobe < ivf.index.nlist
    ivf.nprobe = ivf.index.nlist
    _, ids = ivf.search(queries, 10)
    _, want_ids = full_sort_top_k(gallery, queries, 10)
    np.testing.assert_array_equal(ids, want_ids)


def test_sq8_when_float32_does_not_fit():
    rng = np.random.default_rng(4)
    gallery, queries = unit_vectors(rng, 2000, 32), unit_vectors(rng, 30, 32)
    index = build_index(gallery, kind="faiss", memory_budget_mb=2000 * 32 * 2 / 2**20)
    assert index.backend == "faiss-ivf-sq8"
    index.nprobe = index.index.nlist
    _, ids = index.search(queries, 10)
    _, want_ids = full_sort_top_k(gallery, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want_ids, strict=True)])
    assert overlap > 0.9  # 8-bit codes only perturb near-ties


def test_plans():
    def plan(n, kind="auto", budget=2048, faiss_available=True):
        chosen = plan_index(n, 256, kind=kind, memory_budget_mb=budget, faiss_available=faiss_available)
        return chosen.backend, chosen.storage

    # auto: exact results whenever they fit, numpy for small galleries, 8-bit IVF only when memory forces it.
    assert plan(1000) == ("exact", "float32")
    assert plan(100_000) == ("faiss-flat", "float32")
    assert plan(100_000, faiss_available=False) == ("exact", "float32")
    assert plan(1_000_000) == ("faiss-flat", "float32")
    assert plan(1_000_000, budget=512) == ("exact", "float16")
    assert plan(1_000_000, budget=300) == ("faiss-ivf-sq8", "uint8")
    with pytest.raises(DsmdError, match="raise the budget"):
        plan(1_000_000, budget=300, faiss_available=False)
    # Named backends.
    assert plan(100_000, "exact") == ("exact", "float32")
    assert plan(1_000_000, "exact", budget=512) == ("exact", "float16")
    assert plan(100_000, "faiss") == ("faiss-flat", "float32")
    assert plan(1_000_000, "faiss") == ("faiss-ivf", "float32")
    assert plan(1_000_000, "faiss", budget=512) == ("faiss-ivf-sq8", "uint8")
    with pytest.raises(DsmdError, match="even as 8-bit"):
        plan(1_000_000, "exact", budget=100)
    with pytest.raises(DsmdError, match="even as 8-bit"):
        plan(1_000_000, "faiss", budget=100)
    with pytest.raises(DsmdError, match="not one of"):
        plan(10, "hnsw")


@pytest.mark.parametrize("kind", ["exact", "faiss"])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, kind, mmap):
    rng = np.random.default_rng(5)
    gallery, queries = unit_vectors(rng, 400, 24), unit_vectors(rng, 7, 24)
    ids = np.arange(400) * 3 + 1
    paths = [f"images/{i:05d}.jpg" for i in ids]
    index = build_index(gallery, ids=ids, paths=paths, kind=kind, meta={"teacher": "beit3", "modality": "image"})
    before = index.search(queries, 5)
    index.save(tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", mmap=mmap)
    after = loaded.search(queries, 5)
    assert loaded.backend == index.backend and loaded.dim == 24 and len(loaded) == 400
    assert loaded.meta["teacher"] == "beit3" and loaded.meta["modality"] == "image"
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0])
    assert loaded.paths_of(after[1][:1]) == [[f"images/{i:05d}.jpg" for i in before[1][0]]]


def test_ivf_nprobe_survives_save(tmp_path):
    rng = np.random.default_rng(6)
    index = build_index(unit_vectors(rng, 2000, 8), backend="faiss-ivf")
    index.nprobe = 5
    index.save(tmp_path)
    assert load_index(tmp_path).nprobe == 5
    assert json.loads((tmp_path / "index.json").read_text())["nprobe"] == 5


def test_load_errors(tmp_path):
    with pytest.raises(DsmdError, match="index.json: missing"):
        load_index(tmp_path)
    build_index(np.eye(4, dtype=np.float32), kind="exact").save(tmp_path)
    (tmp_path / "vectors.npy").unlink()
    with pytest.raises(DsmdError, match="vectors.npy: missing"):
        load_index(tmp_path)
    build_index(np.eye(4, dtype=np.float32), kind="exact").save(tmp_path)
    np.save(tmp_path / "ids.npy", np.arange(3))
    with pytest.raises(DsmdError, match="disagree in size"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(DsmdError, match="not valid JSON"):
        load_index(tmp_path)


def test_bad_arguments():
    with pytest.raises(DsmdError, match="distinct id"):
        build_index(np.eye(3, dtype=np.float32), ids=np.array([1, 1, 2]))
    with pytest.raises(DsmdError, match="one per gallery row"):
        build_index(np.eye(3, dtype=np.float32), paths=["a"])
    index = build_index(np.eye(3, dtype=np.float32))
    with pytest.raises(DsmdError, match="dim 2"):
        index.search(np.ones((1, 2), dtype=np.float32), 1)
    with pytest.raises(DsmdError, match="positive integer"):
        index.search(np.ones((1, 3), dtype=np.float32), 0)


def test_time_search_reports_both_latencies():
    rng = np.random.default_rng(7)
    index = build_index(unit_vectors(rng, 100, 8))
    timing = time_search(index, unit_vectors(rng, 5, 8), k=3, n_single=3)
    assert set(timing) == {"single_query_ms", "batched_ms_per_query"}
    assert all(value > 0 for value in timing.values())
