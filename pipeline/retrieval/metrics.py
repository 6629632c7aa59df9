"""Cross-modal retrieval metrics: Recall@K both ways, RSUM, the chance level, student/teacher ratios.

Protocol (METHOD.md): image-to-text R@K is the share of images with at least one of their captions among the K
best-scoring captions; text-to-image R@K is the share of captions whose image is among the K best-scoring
images. Recalls are percentages; RSUM is their sum. Scores are plain dot products, so pass L2-normalised
embeddings (the store's are).

Everything rests on one number per query, its *rank*: how many wrong gallery items score at least as high as
the query's best right item. Recall@K is then simply ``mean(rank < K)``, for any K at once.

Decisions:
- Ties count against the model (pessimistic): a wrong item that scores exactly as high as the best right one
  is ranked before it. A model that gives every pair the same score therefore gets chance-level-or-worse
  recall, never 100 %.
- Any number of captions per image. An image with no caption stays in the text-to-image gallery (it can steal
  top ranks) but asks no image-to-text query, because it has nothing to find; the image-to-text recalls are
  means over the images with at least one caption.
- Queries are scored in blocks, so no queries x gallery score matrix beyond ``memory_budget_mb`` is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import DsmdError

__all__ = [
    "RetrievalRanks",
    "retrieval_ranks",
    "recall_from_ranks",
    "recall_curves",
    "retrieval_metrics",
    "recall_at_k",
    "chance_metrics",
    "chance_curves",
    "ratios",
]

# Scratch bytes per (query, gallery item) entry of a block: the float32 scores, a masked copy and a few
# boolean temporaries.
_BYTES_PER_ENTRY = 16


@dataclass(frozen=True)
class RetrievalRanks:
    """Rank of the best right answer of every query (0 = first place, ties counted against the query).

    ``i2t[q]`` belongs to image ``i2t_image_ids[q]`` (images without captions are left out);
    ``t2i[j]`` belongs to caption row ``j``.
    """

    i2t: np.ndarray
    i2t_image_ids: np.ndarray
    t2i: np.ndarray


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise DsmdError(f"evaluate.ks: recall cut-offs must be positive integers, got {ks!r}")
    return [int(k) for k in ks]


def _as_embeddings(name: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise DsmdError(f"{name}: expected a 2-D array (rows x dim), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DsmdError(f"{name}: expected floating-point embeddings, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise DsmdError(f"{name}: row {bad} holds NaN or infinite values; re-extract or drop that row")
    return array


def _check_inputs(image_emb, text_emb, caption_image):
    image_emb = _as_embeddings("image embeddings", image_emb)
    text_emb = _as_embeddings("text embeddings", text_emb)
    if image_emb.shape[1] != text_emb.shape[1]:
        raise DsmdError(
            f"image embeddings have dim {image_emb.shape[1]} but text embeddings have dim "
            f"{text_emb.shape[1]}; both sides must come from the same model"
        )
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise DsmdError(f"nothing to evaluate: {len(image_emb)} images and {len(text_emb)} captions in the split")
    caption_image = np.asarray(caption_image)
    if caption_image.shape != (len(text_emb),):
        raise DsmdError(
            f"caption_image: expected one image id per caption ({len(text_emb)}), got shape {caption_image.shape}"
        )
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise DsmdError(f"caption_image: expected integer image ids, got dtype {caption_image.dtype}")
    outside = (caption_image < 0) | (caption_image >= len(image_emb))
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise DsmdError(
            f"caption_image: caption row {row} points at image {int(caption_image[row])}, outside the "
            f"{len(image_emb)} images given; pass image ids as rows of the image embeddings"
        )
    return image_emb, text_emb, caption_image.astype(np.int64)


def _block_rows(block: int | None, gallery_size: int, memory_budget_mb: float) -> int:
    if block is not None:
        if block < 1:
            raise DsmdError(f"block must be a positive number of queries, got {block}")
        return int(block)
    return max(1, int(memory_budget_mb * 2**20) // (_BYTES_PER_ENTRY * gallery_size))


def retrieval_ranks(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    *,
    block: int | None = None,
    memory_budget_mb: float = 512,
) -> RetrievalRanks:
    """Rank of the best right answer for every image query (over captions) and caption query (over images).

    ``caption_image[j]`` is the row in ``image_emb`` of caption ``j``'s image. ``block`` (queries scored at
    once) defaults to what fits in ``memory_budget_mb``; the result does not depend on it.
    """
    image_emb, text_emb, caption_image = _check_inputs(image_emb, text_emb, caption_image)
    n_images, n_captions = len(image_emb), len(text_emb)

    i2t = np.empty(n_images, dtype=np.int64)
    rows = _block_rows(block, n_captions, memory_budget_mb)
    for start in range(0, n_images, rows):
        stop = min(start + rows, n_images)
        scores = image_emb[start:stop] @ text_emb.T  # (images in block, captions)
        positive = caption_image[None, :] == np.arange(start, stop)[:, None]
        best_positive = np.where(positive, scores, -np.inf).max(axis=1)
        i2t[start:stop] = ((scores >= best_positive[:, None]) & ~positive).sum(axis=1)

    t2i = np.empty(n_captions, dtype=np.int64)
    rows = _block_rows(block, n_images, memory_budget_mb)
    for start in range(0, n_captions, rows):
        stop = min(start + rows, n_captions)
        scores = text_emb[start:stop] @ image_emb.T  # (captions in block, images)
        own = scores[np.arange(stop - start), caption_image[start:stop]]
        # The caption's own image ties with itself: subtract it.
        t2i[start:stop] = (scores >= own[:, None]).sum(axis=1) - 1

    has_caption = np.bincount(caption_image, minlength=n_images) > 0
    return RetrievalRanks(i2t=i2t[has_caption], i2t_image_ids=np.flatnonzero(has_caption), t2i=t2i)


def recall_from_ranks(ranks: RetrievalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Flat dict ``i2t_r<K>``, ``t2i_r<K>`` (percent) and ``rsum`` (their sum)."""
    ks = _check_ks(ks)
    metrics = {}
    for direction in ("i2t", "t2i"):
        direction_ranks = getattr(ranks, direction)
        for k in ks:
            metrics[f"{direction}_r{k}"] = 100.0 * float(np.mean(direction_ranks < k))
    metrics["rsum"] = sum(metrics.values())
    return metrics


def recall_curves(ranks: RetrievalRanks, max_k: int = 50) -> dict[str, list[float]]:
    """Recall@K in percent for K = 1..max_k, per direction: ``{"i2t": [...], "t2i": [...]}``."""
    ks = np.arange(1, max_k + 1)
    return {
        direction: (100.0 * (getattr(ranks, direction)[:, None] < ks[None, :]).mean(axis=0)).tolist()
        for direction in ("i2t", "t2i")
    }


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block: int | None = None,
    memory_budget_mb: float = 512,
) -> dict[str, float]:
    """Recall@K both ways and RSUM (percent) for the pairs given by ``caption_image``."""
    ks = _check_ks(ks)
    ranks = retrieval_ranks(image_emb, text_emb, caption_image, block=block, memory_budget_mb=memory_budget_mb)
    return recall_from_ranks(ranks, ks)


recall_at_k = retrieval_metrics  # the name docs/architecture.md uses


def _chance_i2t(n_captions: int, captions_per_image: np.ndarray, k: int) -> float:
    """Expected share of images with >= 1 of their c captions in the top k of a uniformly random ranking.

    Hypergeometric: the top k is a random k-subset of the M captions, missing all c with probability
    C(M - c, k) / C(M, k).
    """
    if k >= n_captions:
        return 1.0
    counts, multiplicity = np.unique(captions_per_image, return_counts=True)
    hit = {int(c): 1.0 - math.comb(n_captions - int(c), k) / math.comb(n_captions, k) for c in counts}
    return float(sum(hit[int(c)] * m for c, m in zip(counts, multiplicity, strict=True)) / multiplicity.sum())


def chance_metrics(n_images: int, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Exact expected Recall@K (percent) and RSUM of a random ranking, with the same keys as the metrics.

    Image-to-text is hypergeometric in each image's caption count (images without captions ask no query);
    text-to-image is K / N.
    """
    ks = _check_ks(ks)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if n_images < 1 or len(caption_image) == 0:
        raise DsmdError(f"chance level needs images and captions, got {n_images} and {len(caption_image)}")
    per_image = np.bincount(caption_image, minlength=n_images)
    per_image = per_image[per_image > 0]
    metrics = {f"i2t_r{k}": 100.0 * _chance_i2t(len(caption_image), per_image, k) for k in ks}
    metrics.update({f"t2i_r{k}": 100.0 * min(k, n_images) / n_images for k in ks})
    metrics["rsum"] = sum(metrics.values())
    return metrics


def chance_curves(n_images: int, caption_image: np.ndarray, max_k: int = 50) -> dict[str, list[float]]:
    """Chance Recall@K for K = 1..max_k, in the layout of :func:`recall_curves`."""
    chance = chance_metrics(n_images, caption_image, ks=range(1, max_k + 1))
    return {d: [chance[f"{d}_r{k}"] for k in range(1, max_k + 1)] for d in ("i2t", "t2i")}


def ratios(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """Student / teacher for every metric both have (``rsum_ratio`` is the headline, paper: ~0.9)."""
    return {f"{key}_ratio": student[key] / teacher[key] for key in student if key in teacher and teacher[key] != 0}
