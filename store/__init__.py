"""The teacher feature store: L2-normalised embeddings per teacher, rows = canonical dataset ids.

numpy, zarr and h5py only (no torch, no pipeline), so training data loaders and tools can use it alone.
"""

from store.errors import StoreError
from store.layout import KINDS, ROW_SPACE, SCHEMA_VERSION
from store.reader import StoreReader, open_store
from store.writer import FeatureStore

__all__ = ["KINDS", "ROW_SPACE", "SCHEMA_VERSION", "FeatureStore", "StoreError", "StoreReader", "open_store"]
