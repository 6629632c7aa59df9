"""dsmd extract reading images inside WebDataset shards: the same store rows, bit for bit, as the same images
given as files, in one process and on two Dask workers (fp32 on the CPU, one thread: see test_extract.py)."""

from __future__ import annotations

import pytest
from extract_helpers import FIXTURE, assert_same_contents, base_params, build_world, marks, read_store, write_params
from wds_helpers import shards_from_canonical

from pipeline.config import load_config

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")

N_IMAGES = 16  # 12 train, 2 val, 2 test; one caption each, so that a .txt member holds all of an image's text


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.data.canonical import CanonicalDataset, prepare_dataset

    world = build_world(tmp_path_factory.mktemp("wds-world"), n_train=12, n_val=2, n_test=2, captions_per_image=1)
    shards = shards_from_canonical(CanonicalDataset.load(world.canonical), world.root / "wds", per_shard=6)
    cfg = load_config(write_params(world, world.root / "wds-build", _tar_params(world)))
    prepare_dataset(cfg.data)
    assert (shards / "00002.tar").is_file()
    return world


def _tar_params(world) -> dict:
    params = base_params(world)
    params["data"] = {
        "source": str(world.root / "wds"),
        "images_root": str(world.root / "wds"),
        "canonical_dir": str(world.root / "canonical-wds"),
        "name": "shapes-wds",
    }
    return params


def _tar_config(world, run_dir, **extract):
    return load_config(write_params(world, run_dir, _tar_params(world), **extract))


@pytest.fixture(scope="module")
def from_files(world, tmp_path_factory):
    from extract_helpers import config

    from stages.extract.run import run_extract

    run_dir = tmp_path_factory.mktemp("wds-files")
    run_extract(config(world, run_dir))
    return read_store(run_dir / "features.zarr", world.canonical)


@pytest.fixture(scope="module")
def from_tars(world, tmp_path_factory):
    from stages.extract.run import run_extract

    run_dir = tmp_path_factory.mktemp("wds-tars")
    summary = run_extract(_tar_config(world, run_dir))
    assert summary.rows_encoded == 2 * N_IMAGES and summary.notes == []
    return read_store(run_dir / "features.zarr", world.root / "canonical-wds")


def test_tars_give_the_same_rows_as_files(world, from_files, from_tars):
    from pipeline.data.canonical import CanonicalDataset

    files, tars = CanonicalDataset.load(world.canonical), CanonicalDataset.load(world.root / "canonical-wds")
    assert tars.images.column("split").to_pylist() == files.images.column("split").to_pylist()
    assert tars.texts(tars.caption_ids()) == files.texts(files.caption_ids())
    assert from_tars.valid["image"].all()
    assert_same_contents(from_tars, from_files)


def test_two_dask_workers_reading_tars_equal_one_process(world, from_tars, tmp_path):
    from stages.extract.run import run_extract

    # loader_workers=1: decoding processes on each worker, so the tar members are read (and the dataset with its
    # tar index pickled) in processes two steps away from the one that prepared it.
    summary = run_extract(_tar_config(world, tmp_path, dask_workers=2, loader_workers=1))
    assert summary.workers == 2 and summary.rows_encoded == 2 * N_IMAGES
    assert len(marks(tmp_path / "features.zarr")) == 2 + 2
    assert_same_contents(read_store(tmp_path / "features.zarr", world.root / "canonical-wds"), from_tars)


def test_a_damaged_member_is_skipped_with_the_checks_reason(world, tmp_path):
    """A member whose bytes no longer decode (no check run since): extraction skips it and says why, like a
    bad file; the other rows are untouched."""
    import shutil

    from pipeline.data.canonical import CanonicalDataset, prepare_dataset
    from stages.extract.run import run_extract

    shards = tmp_path / "wds"
    shutil.copytree(world.root / "wds", shards)
    params = _tar_params(world)
    params["data"].update(source=str(shards), images_root=str(shards), canonical_dir=str(tmp_path / "canonical"))
    cfg = load_config(write_params(world, tmp_path / "run", params))
    ds = prepare_dataset(cfg.data)
    member = ds.image_source(3)
    with open(member.shard, "r+b") as handle:  # same size, garbage bytes: the index still points at them
        handle.seek(member.offset)
        handle.write(b"\0" * member.size)
    assert CanonicalDataset.load(cfg.data.canonical_dir).num_images == N_IMAGES
    run_extract(cfg)
    contents = read_store(tmp_path / "run" / "features.zarr", tmp_path / "canonical")
    assert contents.skipped["image"] == {3: "not an image file (unknown or corrupt format)"}
    assert contents.valid["image"].sum() == N_IMAGES - 1


def test_tars_in_a_bucket_give_the_same_rows(world, from_tars, tmp_path):
    """The same shards in an S3 bucket (moto): prepared from there and every member read by a ranged GET, in a
    loader process; the store is the one the shards on disk gave."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import s3fs
    from s3_helpers import make_bucket, moto_server

    from pipeline.data.canonical import prepare
    from stages.extract.run import run_extract

    with moto_server(str(tmp_path / "xdg-cache")):
        make_bucket("team")
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for path in sorted((world.root / "wds").iterdir()):
            fs.put_file(str(path), f"team/wds/{path.name}")
        params = _tar_params(world)
        params["data"].update(source="s3://team/wds", images_root="s3://team", canonical_dir=str(tmp_path / "canon"))
        cfg = load_config(write_params(world, tmp_path / "run", params, loader_workers=1))
        prepare(cfg.data)
        summary = run_extract(cfg)
        assert summary.rows_encoded == 2 * N_IMAGES and summary.notes == []
        remote = read_store(tmp_path / "run" / "features.zarr", tmp_path / "canon")
    assert_same_contents(remote, from_tars)
