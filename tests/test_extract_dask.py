"""dsmd extract fanned out over Dask: a local cluster of two worker processes, and a running scheduler given by
address. Both must write the same store as one in-process run (exactly: same shards, same batches, fp32 on the
CPU with one thread per worker)."""

from __future__ import annotations

import dataclasses

import pytest
from extract_helpers import FIXTURE, assert_same_contents, build_world, config, marks, read_store

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("dask-world"), n_train=12, n_val=2, n_test=2, captions_per_image=2)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    from stages.extract.run import run_extract

    run_dir = tmp_path_factory.mktemp("dask-reference")
    run_extract(config(world, run_dir))
    return read_store(run_dir / "features.zarr", world.canonical)


def test_two_local_dask_workers_write_the_same_store(world, reference, tmp_path):
    from stages.extract.run import run_extract

    # loader_workers=1: the local cluster's workers are not daemonic, so they may start decoding processes
    # (spawned: the image paths and the transform must pickle).
    summary = run_extract(config(world, tmp_path, dask_workers=2, loader_workers=1))

    assert summary.workers == 2
    assert summary.shards_written == 2 + 4 and summary.rows_encoded == 16 + 32
    assert summary.notes == []
    assert len(marks(tmp_path / "features.zarr")) == 6
    assert_same_contents(read_store(tmp_path / "features.zarr", world.canonical), reference)


def test_a_running_scheduler_by_address(world, reference, tmp_path):
    import dask
    from dask.distributed import LocalCluster

    from stages.extract.run import run_extract
    from store.errors import StoreMismatchError

    # A cluster as someone else would start it: daemonic workers (Dask's default), which may not start
    # processes of their own, so the stage decodes in the worker and says so.
    with dask.config.set({"distributed.worker.daemon": True}), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        cfg = config(world, tmp_path, dask_scheduler=cluster.scheduler_address, loader_workers=1)
        summary = run_extract(cfg)
        assert summary.workers == 1 and summary.shards_written == 6
        assert any("daemonic" in note for note in summary.notes)
        assert_same_contents(read_store(tmp_path / "features.zarr", world.canonical), reference)

        # The cluster outlived the run. Now another image transform (so another provenance) on a complete
        # store: a worker still checks the arrays, and its refusal arrives as itself (--replace-stale acts on it).
        other = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, img_size=48))
        with pytest.raises(StoreMismatchError, match="another teacher setup"):
            run_extract(other)
        assert run_extract(other, replace_stale=True).shards_written == 6

