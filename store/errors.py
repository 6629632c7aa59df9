"""Errors of the feature store. The store stands alone (numpy, zarr, h5py), so it has its own error type."""


class StoreError(Exception):
    """A store problem the user can act on: wrong dataset, teacher or dimension, missing or corrupt shard."""


class StoreMismatchError(StoreError):
    """The store at the path was made for another dataset, layout or teacher setup than the one asked for."""
