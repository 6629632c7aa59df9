"""Helpers for tests and benchmarks of the store (and of code that writes stores): synthetic features."""

from __future__ import annotations

import numpy as np

from store.writer import FeatureStore


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n random L2-normalised float32 rows of size dim."""
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fill(
    store: FeatureStore,
    teacher: str,
    kind: str,
    values: np.ndarray,
    skipped: dict[int, str] | None = None,
    shards: list[int] | None = None,
) -> list[int]:
    """Write `values` (all rows of the kind) into the given shards (default: every pending one)."""
    skipped = skipped or {}
    todo = store.pending_shards(teacher, kind) if shards is None else shards
    for shard in todo:
        start, stop = store.shard_rows(teacher, kind, shard)
        mine = {row: why for row, why in skipped.items() if start <= row < stop}
        store.write_shard(teacher, kind, shard, values[start:stop], skipped=mine)
    return list(todo)
