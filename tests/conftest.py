"""Fixtures shared by several test modules (requested by name, or with ``pytest.mark.usefixtures``)."""

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


@pytest.fixture(scope="module")
def s3(request, tmp_path_factory):
    """A real local S3 server (moto, tests/s3_helpers.py) for one test module, with readers' shard cache under the
    module's temporary directory and the bucket the module names in S3_BUCKET (moto keeps one set of buckets per
    process, so each module has its own). Yields the endpoint URL."""
    from s3_helpers import make_bucket, moto_server

    with moto_server(str(tmp_path_factory.mktemp("xdg-cache"))) as endpoint:
        make_bucket(request.module.S3_BUCKET)
        yield endpoint
