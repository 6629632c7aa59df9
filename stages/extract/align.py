"""MCAD's fixed linear alignment from a single-stream teacher's fused space into a dual-stream teacher's space:
the least-squares fit. How a map is named, saved and loaded is shared with distill: pipeline/alignment.py.

Our formulation (METHOD.md, "MCAD"; the choices below are ours):
- the map W (d_fused x d_dual) is fitted once, by least squares over the training pairs k whose fused row and
  both dual rows are valid:  W = argmin_W  1/n sum_k || f(k) W - y(k) ||^2 + ridge ||W||_F^2,
  where f(k) is the stored (unit) fused feature of pair k and the target y(k) = (t_v(i_k) + t_t(j_k)) / 2 is the
  midpoint of the pair's dual-stream image and caption features: the point in the dual space that stands for
  the pair as a whole, as f(k) does in the fused space. No bias term (the map is linear, as METHOD.md says).
- with ridge 0 the minimum-norm solution is taken, so a rank-deficient fused space still gives one answer.
- at training time the aligned feature is normalize(f W) (see stages/distill/mcad.py), so beta weighs a unit
  vector against the unit teacher features whatever the scale of the fit.
The normal equations are accumulated in float64 over chunks, so the fit streams through any number of pairs
in O(d^2) memory. numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.alignment import LinearFit, alignment_inputs, alignment_name, save_alignment, stale_reason
from pipeline.errors import DsmdError
from store.errors import StoreError
from store.extras import get_extra, has_extra

__all__ = ["fit_linear_map", "pair_rows", "fit_alignment", "ensure_alignment"]


def fit_linear_map(chunks: Iterable[tuple[np.ndarray, np.ndarray]], ridge: float = 0.0) -> LinearFit:
    """Least-squares W with X W ~ Y over all (X, Y) row chunks (min-norm when X^T X is singular)."""
    if ridge < 0:
        raise DsmdError(f"distill.mcad.align_ridge must be 0 or more, got {ridge}")
    gram = cross = y_sum = None
    y_sq = 0.0
    rows = 0
    for x, y in chunks:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise DsmdError(f"least-squares fit needs row-aligned 2-D chunks, got {x.shape} and {y.shape}")
        if gram is None:
            gram = np.zeros((x.shape[1], x.shape[1]))
            cross = np.zeros((x.shape[1], y.shape[1]))
            y_sum = np.zeros(y.shape[1])
        gram += x.T @ x
        cross += x.T @ y
        y_sum += y.sum(axis=0)
        y_sq += float((y * y).sum())
        rows += len(x)
    if rows == 0 or gram is None:
        raise DsmdError("no rows to fit the alignment on (no training pair has valid fused and dual features)")
    normal = gram / rows + ridge * np.eye(len(gram))
    weight, _, rank, _ = np.linalg.lstsq(normal, cross / rows, rcond=None)
    sse = y_sq - 2.0 * float((weight * cross).sum()) + float((weight * (gram @ weight)).sum())
    sst = y_sq - float((y_sum * y_sum).sum()) / rows
    r2 = 1.0 - max(sse, 0.0) / sst if sst > 0 else 1.0
    return LinearFit(weight=weight, rows=rows, rank=int(rank), r2=r2)


def pair_rows(reader, ds, fused_teacher: str, dual_teacher: str, split: str = "train") -> np.ndarray:
    """Caption ids of `split` whose fused pair row and dual image and text rows are all valid."""
    caption_ids = ds.caption_ids(split)
    image_of = ds.caption_image_ids()
    keep = (
        reader.valid(fused_teacher, "pair")[caption_ids]
        & reader.valid(dual_teacher, "text")[caption_ids]
        & reader.valid(dual_teacher, "image")[image_of[caption_ids]]
    )
    return caption_ids[keep]


def _chunks(reader, ds, fused: str, dual: str, ids: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    image_of = ds.caption_image_ids()
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        x = reader.get(fused, "pair", part)
        y = 0.5 * (reader.get(dual, "image", image_of[part]) + reader.get(dual, "text", part))
        yield x, y


def fit_alignment(
    reader, ds, fused_teacher: str, dual_teacher: str, *, split: str = "train", ridge: float = 0.0, chunk: int = 8192
) -> LinearFit:
    """Fit the map on `split`'s pairs of the canonical dataset `ds`, reading the store through `reader`."""
    _require(reader, fused_teacher, ("pair",))
    _require(reader, dual_teacher, ("image", "text"))
    ids = pair_rows(reader, ds, fused_teacher, dual_teacher, split)
    if len(ids) == 0:
        raise DsmdError(
            f"no {split} pair has valid {fused_teacher}/pair, {dual_teacher}/image and {dual_teacher}/text rows: "
            "was the split extracted (extract.splits, distill.mcad.pair_splits)?"
        )
    return fit_linear_map(_chunks(reader, ds, fused_teacher, dual_teacher, ids, chunk), ridge)


def _require(reader, teacher: str, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        if (teacher, kind) not in reader.arrays():
            hint = "dsmd extract-pairs" if kind == "pair" else f"dsmd extract with teacher.name={teacher}"
            raise DsmdError(f"{reader.path}: no {teacher}/{kind} features; run {hint} first")
        if not reader.complete(teacher, kind):
            raise DsmdError(
                f"{reader.path}: {teacher}/{kind} is not fully extracted; rerun the extraction to finish it"
            )


def ensure_alignment(
    store_path: str | Path, reader, ds, fused_teacher: str, dual_teacher: str, *, split: str = "train",
    ridge: float = 0.0,
) -> tuple[LinearFit | None, dict]:
    """Fit and save the map unless an up-to-date one is stored. Returns (the new fit or None, its provenance)."""
    inputs = alignment_inputs(reader, fused_teacher, dual_teacher, split, ridge)
    name = alignment_name(fused_teacher, dual_teacher)
    if has_extra(store_path, name):
        try:
            stored = get_extra(store_path, name, dataset_fingerprint=ds.fingerprint)
        except StoreError:
            stored = None  # damaged or another dataset: fit again
        if stored is not None and stale_reason(stored.provenance, inputs) is None:
            return None, stored.provenance
    fit = fit_alignment(reader, ds, fused_teacher, dual_teacher, split=split, ridge=ridge)
    save_alignment(store_path, fit, inputs, ds.fingerprint)
    return fit, get_extra(store_path, name).provenance
