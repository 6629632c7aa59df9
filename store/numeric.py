"""Fast float16 -> float32 conversion (numpy's element-wise float16 cast is slow on many CPUs)."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _half_to_single() -> np.ndarray:
    """float16 bit pattern -> float32 value for all 65536 patterns, made by numpy's own cast (so exact)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def to_float32(rows: np.ndarray) -> np.ndarray:
    """rows as float32: a table look-up for float16 (bit-exact, ~2x faster than astype), astype otherwise."""
    if rows.dtype == np.float32:
        return rows
    if rows.dtype.kind == "f" and rows.dtype.itemsize == 2:
        bits = rows.view(np.uint16) if rows.dtype.isnative else rows.astype(np.float16).view(np.uint16)
        return np.take(_half_to_single(), bits)
    return rows.astype(np.float32)
