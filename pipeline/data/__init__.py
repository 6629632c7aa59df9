"""Datasets: source readers (Karpathy JSON, CSV/JSONL/Parquet tables) filling a row checker (rows), the canonical
dataset, image decoding, the dataset check and the usable-pairs rule (pairs). No torch here.

The main names are importable from this package; they load on first use so that the CLI starts quickly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CanonicalDataset": "pipeline.data.canonical",
    "prepare_dataset": "pipeline.data.canonical",
    "load_or_prepare": "pipeline.data.canonical",
    "BadImageError": "pipeline.data.images",
    "load_rgb": "pipeline.data.images",
    "check_dataset": "pipeline.data.check",
    "load_bad_images": "pipeline.data.check",
    "CheckReport": "pipeline.data.check",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
