"""Recall@K, RSUM and chance level against a brute-force reference, hand-made cases and Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import DsmdError
from pipeline.retrieval.metrics import (
    chance_curves,
    chance_metrics,
    ratios,
    recall_curves,
    retrieval_metrics,
    retrieval_ranks,
)

KS = (1, 2, 5, 10)


def reference_metrics(image_emb, text_emb, caption_image, ks):
    """Explicit loops and a full sort; among equal scores the wrong items go first (ties count against)."""
    n_images, n_captions = len(image_emb), len(text_emb)
    i2t_first, t2i_first = [], []
    for i in range(n_images):
        positives = [j for j in range(n_captions) if caption_image[j] == i]
        if not positives:
            continue
        scores = [float(np.dot(image_emb[i].astype(np.float64), text_emb[j])) for j in range(n_captions)]
        order = sorted(range(n_captions), key=lambda j: (-scores[j], j in positives))
        i2t_first.append(min(order.index(j) for j in positives))
    for j in range(n_captions):
        scores = [float(np.dot(text_emb[j].astype(np.float64), image_emb[i])) for i in range(n_images)]
        order = sorted(range(n_images), key=lambda i: (-scores[i], i == caption_image[j]))
        t2i_first.append(order.index(caption_image[j]))
    metrics = {}
    for name, first in (("i2t", i2t_first), ("t2i", t2i_first)):
        for k in ks:
            metrics[f"{name}_r{k}"] = 100.0 * sum(p < k for p in first) / len(first)
    metrics["rsum"] = sum(metrics.values())
    return metrics


@st.composite
def retrieval_problems(draw, integer_valued: bool):
    """Images with 0..7 captions each, small dims. Integer values make ties frequent and exact."""
    n_images = draw(st.integers(1, 8))
    dim = draw(st.integers(1, 4))
    per_image = draw(st.lists(st.integers(0, 7), min_size=n_images, max_size=n_images))
    if sum(per_image) == 0:
        per_image[0] = 1
    caption_image = np.repeat(np.arange(n_images), per_image)
    caption_image = np.array(draw(st.permutations(caption_image.tolist())), dtype=np.int64)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape_i, shape_t = (n_images, dim), (len(caption_image), dim)
    if integer_valued:
        image_emb = rng.integers(-2, 3, shape_i).astype(np.float32)
        text_emb = rng.integers(-2, 3, shape_t).astype(np.float32)
    else:
        image_emb = rng.standard_normal(shape_i).astype(np.float32)
        text_emb = rng.standard_normal(shape_t).astype(np.float32)
    return image_emb, text_emb, caption_image


@settings(max_examples=150, deadline=None)
@given(retrieval_problems(integer_valued=True), st.integers(1, 20))
def test_matches_reference_with_ties(problem, block):
    image_emb, text_emb, caption_image = problem
    expected = reference_metrics(image_emb, text_emb, caption_image, KS)
    got = retrieval_metrics(image_emb, text_emb, caption_image, KS, block=block)
    assert got == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(retrieval_problems(integer_valued=False))
def test_matches_reference_random_floats(problem):
    image_emb, text_emb, caption_image = problem
    expected = reference_metrics(image_emb, text_emb, caption_image, KS)
    assert retrieval_metrics(image_emb, text_emb, caption_image, KS) == pytest.approx(expected)


def test_block_size_does_not_matter():
    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(40), rng.integers(0, 8, 40))
    image_emb = rng.standard_normal((40, 16)).astype(np.float32)
    text_emb = rng.standard_normal((len(caption_image), 16)).astype(np.float32)
    whole = retrieval_ranks(image_emb, text_emb, caption_image, block=10_000)
    for block in (1, 3, 17, 39):
        ranks = retrieval_ranks(image_emb, text_emb, caption_image, block=block)
        np.testing.assert_array_equal(ranks.i2t, whole.i2t)
        np.testing.assert_array_equal(ranks.t2i, whole.t2i)
    # A tiny memory budget forces one query per block.
    tiny = retrieval_ranks(image_emb, text_emb, caption_image, memory_budget_mb=1e-6)
    np.testing.assert_array_equal(tiny.i2t, whole.i2t)
    np.testing.assert_array_equal(tiny.t2i, whole.t2i)


def test_perfect_retrieval_gives_600():
    image_emb = np.eye(3, dtype=np.float32)
    caption_image = np.array([0, 0, 1, 2, 2, 2])
    text_emb = image_emb[caption_image]
    metrics = retrieval_metrics(image_emb, text_emb, caption_image)
    assert metrics == {
        "i2t_r1": 100.0,
        "i2t_r5": 100.0,
        "i2t_r10": 100.0,
        "t2i_r1": 100.0,
        "t2i_r5": 100.0,
        "t2i_r10": 100.0,
        "rsum": 600.0,
    }


def test_hand_computed_ranks():
    # Images on the axes; captions chosen so every rank is known.
    image_emb = np.eye(3, dtype=np.float32)
    caption_image = np.array([0, 0, 1, 2])
    text_emb = np.array(
        [
            [0.1, 0.9, 0.0],  # image 0's first caption, closer to image 1
            [0.5, 0.0, 0.8],  # image 0's second caption, closer to image 2
            [0.0, 1.0, 0.0],  # image 1: exact
            [0.0, 0.3, 0.2],  # image 2: image 1 scores higher
        ],
        dtype=np.float32,
    )
    ranks = retrieval_ranks(image_emb, text_emb, caption_image)
    # Image 0: its captions score 0.1 and 0.5, the best positive (0.5) beats both negatives (0, 0).
    # Image 1: caption 2 scores 1.0, caption 0 scores 0.9: rank 0.
    # Image 2: caption 1 scores 0.8 (a negative), its own caption 0.2: rank 1.
    np.testing.assert_array_equal(ranks.i2t, [0, 0, 1])
    # Captions: c0 -> image 1 first (0.9 > 0.1): rank 1; c1 -> image 2 first: rank 1; c2 rank 0; c3 rank 1.
    np.testing.assert_array_equal(ranks.t2i, [1, 1, 0, 1])
    metrics = retrieval_metrics(image_emb, text_emb, caption_image, ks=(1, 2))
    assert metrics["i2t_r1"] == pytest.approx(200 / 3)
    assert metrics["i2t_r2"] == 100.0
    assert metrics["t2i_r1"] == 25.0
    assert metrics["t2i_r2"] == 100.0


def test_ties_count_against_the_model():
    # Every pair scores the same: the right answer lands behind every wrong one.
    image_emb = np.ones((3, 4), dtype=np.float32) / 2
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    text_emb = np.ones((6, 4), dtype=np.float32) / 2
    ranks = retrieval_ranks(image_emb, text_emb, caption_image)
    np.testing.assert_array_equal(ranks.i2t, [4, 4, 4])  # 4 wrong captions each
    np.testing.assert_array_equal(ranks.t2i, [2] * 6)  # 2 wrong images each
    metrics = retrieval_metrics(image_emb, text_emb, caption_image, ks=(1, 4, 5))
    assert metrics["i2t_r1"] == 0.0 and metrics["i2t_r4"] == 0.0 and metrics["i2t_r5"] == 100.0
    assert metrics["t2i_r1"] == 0.0 and metrics["t2i_r4"] == 100.0


def test_image_without_captions_is_gallery_only():
    # Image 2 has no caption: it asks no image-to-text query but outranks the right image for caption 1.
    image_emb = np.array([[1, 0, 0], [0, 1, 0], [0, 0.6, 0.8]], dtype=np.float32)
    caption_image = np.array([0, 1])
    text_emb = np.array([[1, 0, 0], [0, 0.6, 0.8]], dtype=np.float32)
    ranks = retrieval_ranks(image_emb, text_emb, caption_image)
    np.testing.assert_array_equal(ranks.i2t_image_ids, [0, 1])
    np.testing.assert_array_equal(ranks.i2t, [0, 0])
    np.testing.assert_array_equal(ranks.t2i, [0, 1])
    metrics = retrieval_metrics(image_emb, text_emb, caption_image, ks=(1,))
    assert metrics == {"i2t_r1": 100.0, "t2i_r1": 50.0, "rsum": 150.0}


def test_float16_input_is_accepted():
    rng = np.random.default_rng(1)
    image_emb = rng.standard_normal((5, 8)).astype(np.float16)
    caption_image = np.repeat(np.arange(5), 2)
    text_emb = rng.standard_normal((10, 8)).astype(np.float16)
    got = retrieval_metrics(image_emb, text_emb, caption_image)
    expected = reference_metrics(image_emb.astype(np.float32), text_emb.astype(np.float32), caption_image, (1, 5, 10))
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, t, c: (i, t[:, :3], c), "dim"),
        (lambda i, t, c: (i, t, c[:-1]), "one image id per caption"),
        (lambda i, t, c: (i, t, c + 5), "caption row 0 points at image 5"),
        (lambda i, t, c: (i, t, c.astype(float)), "integer"),
        (lambda i, t, c: (np.where(np.arange(4)[:, None] == 2, np.nan, i), t, c), "row 2"),
        (lambda i, t, c: (i[:0], t, c * 0), "nothing to evaluate"),
    ],
)
def test_bad_inputs_are_named(change, message):
    image_emb = np.eye(4, dtype=np.float32)
    text_emb = np.eye(4, dtype=np.float32)
    caption_image = np.arange(4)
    with pytest.raises(DsmdError, match=message):
        retrieval_metrics(*change(image_emb, text_emb, caption_image))


def test_bad_ks():
    with pytest.raises(DsmdError, match="positive integers"):
        retrieval_metrics(np.eye(2), np.eye(2), np.arange(2), ks=(0, 5))


def test_curves_agree_with_metrics():
    rng = np.random.default_rng(2)
    caption_image = np.repeat(np.arange(30), 5)
    image_emb = rng.standard_normal((30, 8)).astype(np.float32)
    text_emb = (image_emb[caption_image] + rng.standard_normal((150, 8))).astype(np.float32)
    ranks = retrieval_ranks(image_emb, text_emb, caption_image)
    curves = recall_curves(ranks, max_k=50)
    metrics = retrieval_metrics(image_emb, text_emb, caption_image, ks=(1, 5, 10, 50))
    for k in (1, 5, 10, 50):
        assert curves["i2t"][k - 1] == pytest.approx(metrics[f"i2t_r{k}"])
        assert curves["t2i"][k - 1] == pytest.approx(metrics[f"t2i_r{k}"])
    assert all(np.diff(curves["i2t"]) >= 0) and curves["t2i"][-1] == 100.0


def test_chance_closed_forms():
    # One caption per image: i2t chance is K / M; t2i is K / N; K beyond the gallery is certain.
    caption_image = np.arange(10)
    chance = chance_metrics(10, caption_image, ks=(1, 5, 20))
    assert chance["i2t_r1"] == pytest.approx(10.0)
    assert chance["i2t_r5"] == pytest.approx(50.0)
    assert chance["i2t_r20"] == 100.0 and chance["t2i_r20"] == 100.0
    # Five captions of 25, K = 1: 5/25. K = 2: 1 - (20*19)/(25*24).
    chance = chance_metrics(5, np.repeat(np.arange(5), 5), ks=(1, 2))
    assert chance["i2t_r1"] == pytest.approx(20.0)
    assert chance["i2t_r2"] == pytest.approx(100 * (1 - 20 * 19 / (25 * 24)))
    assert chance["t2i_r1"] == pytest.approx(20.0)
    assert chance["rsum"] == pytest.approx(sum(v for key, v in chance.items() if key != "rsum"))


def test_chance_by_monte_carlo():
    """Random rankings, simulated by shuffling, give the closed-form expectation."""
    rng = np.random.default_rng(3)
    n_images = 12
    caption_image = np.repeat(np.arange(n_images), rng.integers(0, 8, n_images))
    n_captions = len(caption_image)
    ks = (1, 3, 10)
    trials = 4000
    hits = {f"{d}_r{k}": 0.0 for d in ("i2t", "t2i") for k in ks}
    queries = np.unique(caption_image)
    for _ in range(trials):
        for k in ks:
            # Image-to-text: the top k of a random ranking is a random k-subset of the captions.
            top = np.argsort(rng.random((len(queries), n_captions)), axis=1)[:, :k]
            hit = (caption_image[top] == queries[:, None]).any(axis=1)
            hits[f"i2t_r{k}"] += 100 * hit.mean() / trials
            position = rng.integers(0, n_images, n_captions)  # where each caption's image lands
            hits[f"t2i_r{k}"] += 100 * (position < k).mean() / trials
    chance = chance_metrics(n_images, caption_image, ks)
    for key, value in hits.items():
        # Standard error of the mean is below 100 / sqrt(trials * queries) ~ 0.5 points.
        assert value == pytest.approx(chance[key], abs=1.5), key


def test_chance_matches_random_embeddings():
    """Independent Gaussian embeddings rank the gallery uniformly at random: the metrics average to chance."""
    rng = np.random.default_rng(4)
    n_images = 15
    caption_image = np.repeat(np.arange(n_images), rng.integers(1, 8, n_images))
    ks = (1, 5)
    runs = [
        retrieval_metrics(
            rng.standard_normal((n_images, 8)), rng.standard_normal((len(caption_image), 8)), caption_image, ks
        )
        for _ in range(600)
    ]
    chance = chance_metrics(n_images, caption_image, ks)
    for key in chance:
        assert np.mean([run[key] for run in runs]) == pytest.approx(chance[key], abs=0.05 * chance[key] + 1)


def test_chance_curves_shape():
    curves = chance_curves(100, np.repeat(np.arange(100), 5), max_k=50)
    assert len(curves["i2t"]) == 50 and curves["t2i"][0] == pytest.approx(1.0)
    assert curves["t2i"][49] == pytest.approx(50.0)


def test_ratios():
    student = {"rsum": 528.8, "i2t_r1": 82.0}
    teacher = {"rsum": 586.5, "i2t_r1": 98.0, "t2i_r1": 90.3}
    got = ratios(student, teacher)
    assert got == pytest.approx({"rsum_ratio": 528.8 / 586.5, "i2t_r1_ratio": 82.0 / 98.0})
