"""MCAD's alignment maps as the feature store keeps them: their names, what a map depends on, saving and loading.

A map W (d_fused x d_dual) carries a single-stream teacher's fused pair features into a dual-stream teacher's
space (METHOD.md, "MCAD"). `dsmd extract-pairs` fits it (the least-squares fit: stages/extract/align.py) and
saves it here as a store extra (store/extras.py) with its provenance; `dsmd distill` loads it and refuses one
fitted on other features or settings. At training time the aligned feature is normalize(f W)
(stages/distill/mcad.py). numpy only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline.errors import DsmdError
from store.errors import StoreError
from store.extras import get_extra, put_extra
from store.layout import stable_provenance

__all__ = [
    "TARGET",
    "MAP_USE",
    "LinearFit",
    "alignment_name",
    "alignment_inputs",
    "stale_reason",
    "save_alignment",
    "load_alignment",
]

TARGET = "(t_v(image) + t_t(caption)) / 2 of the dual-stream teacher, per training pair"
MAP_USE = "aligned = normalize(fused @ W); W has shape (d_fused, d_dual)"


@dataclass(frozen=True)
class LinearFit:
    """A fitted map and how well it fits (stored with it as provenance)."""

    weight: np.ndarray  # (d_in, d_out) float64
    rows: int
    rank: int  # numerical rank of the (regularised) normal matrix
    r2: float  # 1 - SSE / SST, SST about the column means of Y


def alignment_name(fused_teacher: str, dual_teacher: str) -> str:
    """The store extra that holds the map from `fused_teacher`/pair into `dual_teacher`'s space."""
    return f"mcad-align--{fused_teacher}--{dual_teacher}"


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def alignment_inputs(reader, fused_teacher: str, dual_teacher: str, split: str, ridge: float) -> dict:
    """What the fit depends on: the three arrays' provenance digests, the split and the ridge."""
    return {
        "fused_teacher": fused_teacher,
        "dual_teacher": dual_teacher,
        "fused_pair_provenance_sha256": _digest(stable_provenance(reader.provenance(fused_teacher, "pair"))),
        "dual_image_provenance_sha256": _digest(stable_provenance(reader.provenance(dual_teacher, "image"))),
        "dual_text_provenance_sha256": _digest(stable_provenance(reader.provenance(dual_teacher, "text"))),
        "split": split,
        "ridge": ridge,
        "target": TARGET,
        "map": MAP_USE,
    }


def save_alignment(store_path: str | Path, fit: LinearFit, inputs: dict, dataset_fingerprint: str) -> Path:
    """Store the map (float32) as the extra named by ``inputs``' teachers, its inputs and fit as provenance."""
    provenance = {
        "kind": "mcad-alignment",
        **inputs,
        "rows": fit.rows,
        "rank": fit.rank,
        "r2": fit.r2,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    name = alignment_name(inputs["fused_teacher"], inputs["dual_teacher"])
    return put_extra(
        store_path, name, fit.weight.astype(np.float32), dataset_fingerprint=dataset_fingerprint, provenance=provenance
    )


def stale_reason(stored: dict, inputs: dict) -> str | None:
    """Why a stored map's provenance no longer matches what it would be fitted on now (None: up to date)."""
    for key, value in inputs.items():
        if stored.get(key) != value:
            return f"{key} changed ({stored.get(key)!r} when it was fitted, {value!r} now)"
    return None


def load_alignment(
    store_path: str | Path,
    fused_teacher: str,
    dual_teacher: str,
    *,
    dataset_fingerprint: str,
    reader=None,
    split: str | None = None,
    ridge: float | None = None,
) -> np.ndarray:
    """The stored map (float32, d_fused x d_dual). With a reader, refuse a map fitted on other features
    (or, when split / ridge are given, with other settings): rerun `dsmd extract-pairs` to refit it."""
    name = alignment_name(fused_teacher, dual_teacher)
    try:
        extra = get_extra(store_path, name, dataset_fingerprint=dataset_fingerprint)
    except StoreError as exc:
        raise DsmdError(f"{exc}. Run dsmd extract-pairs to fit the MCAD alignment maps") from None
    if reader is not None:
        stored = extra.provenance
        inputs = alignment_inputs(
            reader, fused_teacher, dual_teacher,
            stored.get("split") if split is None else split,
            stored.get("ridge") if ridge is None else ridge,
        )
        reason = stale_reason(stored, inputs)
        if reason is not None:
            raise DsmdError(f"{store_path}: the alignment {name} is out of date: {reason}; rerun dsmd extract-pairs")
    return extra.value.astype(np.float32, copy=False)


