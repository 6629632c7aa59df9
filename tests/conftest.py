"""Fixtures shared by the test modules that opt in with ``pytest.mark.usefixtures``."""

import pytest


@pytest.fixture
def one_thread():
    """One intra-op torch thread: on a small shared machine several spinning OpenMP threads per process make a
    tiny model many times slower (and subprocess runs use one thread too, so in-process results compare)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def export_world(tmp_path_factory):
    """A tiny student exported and bundled by `dsmd export` (tests/export_helpers.py); read-only for its users."""
    from tests.export_helpers import build_export_world

    return build_export_world(tmp_path_factory.mktemp("export_world"))
