"""The teacher feature store: L2-normalised embeddings per teacher, rows = canonical dataset ids.

numpy, zarr and h5py only (no torch, no pipeline), so training data loaders and tools can use it alone.
The names below load on first use, so that `from store.errors import StoreError` (done by every `dsmd`
command) does not pay for importing zarr and h5py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from store.errors import StoreError
from store.layout import KINDS, ROW_SPACE, SCHEMA_VERSION

if TYPE_CHECKING:
    from store.reader import StoreReader, open_store
    from store.writer import FeatureStore

_LAZY = {"FeatureStore": "store.writer", "StoreReader": "store.reader", "open_store": "store.reader"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")


__all__ = ["KINDS", "ROW_SPACE", "SCHEMA_VERSION", "FeatureStore", "StoreError", "StoreReader", "open_store"]
