"""WebDataset shards in a bucket (pipeline/data/bucket.py), against a real local S3 server (moto,
tests/s3_helpers.py): prepared from the bucket they give the same canonical dataset as from disk, check reads
their members by ranged GETs and records the bad one, and a changed, missing or unreachable shard is one line
naming its URL."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from data_helpers import data_config, jpeg_bytes
from wds_helpers import write_shard

from pipeline.data.bucket import BucketError
from pipeline.data.canonical import CanonicalDataset, is_up_to_date, prepare
from pipeline.data.check import check_dataset
from pipeline.data.scan import CanonicalScan
from pipeline.data.shards import ShardError
from pipeline.errors import DsmdError

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "s3://shards/wds"


S3_BUCKET = "shards"  # created by the `s3` fixture (tests/conftest.py)


def _sample(key, caption, split, image=None):
    return {"__key__": key, "jpg": image if image is not None else jpeg_bytes(seed=int(key)),
            "txt": caption, "json": {"split": split}}


@pytest.fixture
def shards(tmp_path, s3):
    """Two shards on disk and the same two in the bucket (with their img2dataset tables); one member is cut."""
    import s3fs

    root = tmp_path / "wds"
    cut = jpeg_bytes(seed=3)
    write_shard(root / "00000.tar", [_sample("100", "a red square", "train"), _sample("101", "shared", "test"),
                                     _sample("102", "cut", "train", image=cut[: len(cut) // 2])])
    write_shard(root / "00001.tar", [_sample("200", "a dog", "val"), _sample("201", "Shared ", "test")])
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.rm(BUCKET[len("s3://"):], recursive=True) if fs.exists(BUCKET[len("s3://"):]) else None
    for path in sorted(root.iterdir()):
        fs.put_file(str(path), f"{BUCKET[len('s3://'):]}/{path.name}")
    return root


def _bucket_config(tmp_path: Path, **settings):
    return dataclasses.replace(data_config(tmp_path, Path("unused")), **{"source": BUCKET, "images_root": BUCKET,
                                                                         **settings})


def test_prepared_from_the_bucket_it_is_the_dataset_prepared_from_disk(tmp_path, shards):
    local = CanonicalDataset.load(prepare(data_config(tmp_path / "local", shards, shards)))
    cfg = _bucket_config(tmp_path / "remote")
    remote = CanonicalDataset.load(prepare(cfg))
    assert remote.fingerprint == local.fingerprint
    assert remote.tar_index.to_table().equals(local.tar_index.to_table())
    assert remote.images_root == BUCKET and remote.card()["images_root"] == BUCKET
    assert str(remote.image_source(0)) == f"{BUCKET}/00000.tar/100.jpg"
    assert remote.image_source(0).read() == local.image_source(0).read()
    assert not [p for p in Path(cfg.canonical_dir).iterdir() if p.name.startswith(".")]  # downloads removed
    assert is_up_to_date(cfg)


def test_check_reads_members_from_the_bucket_and_records_the_cut_one(tmp_path, shards):
    local = check_dataset(CanonicalScan(prepare(data_config(tmp_path / "local", shards, shards))), workers=2,
                          progress=False)
    remote = check_dataset(CanonicalScan(prepare(_bucket_config(tmp_path / "remote"))), workers=2, progress=False)
    assert [(b.image_id, b.path, b.reason) for b in remote.bad_images] == [
        (b.image_id, b.path, b.reason) for b in local.bad_images]
    assert [b.path for b in remote.bad_images] == ["00000.tar/102.jpg"]
    assert remote.caption_warnings == local.caption_warnings


def test_a_changed_or_missing_shard_in_the_bucket_is_one_line_naming_its_url(tmp_path, shards):
    import s3fs

    cfg = _bucket_config(tmp_path)
    prepare(cfg)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    key = f"{BUCKET[len('s3://'):]}/00001.tar"
    fs.pipe_file(key, (shards / "00001.tar").read_bytes() + b"\0" * 512)
    assert not is_up_to_date(cfg)
    with pytest.raises(ShardError, match=rf"^{BUCKET}/00001.tar: shard is .* bytes but was .* when indexed"):
        CanonicalDataset.load(cfg.canonical_dir)
    fs.rm_file(key)
    with pytest.raises(ShardError, match=rf"^{BUCKET}/00001.tar: shard missing") as caught:
        CanonicalScan(cfg.canonical_dir)
    assert "\n" not in str(caught.value)


def test_an_unreachable_endpoint_is_one_line(tmp_path, shards, monkeypatch):
    from s3_helpers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BucketError, match=rf"^{BUCKET}: cannot reach the object store at http://127.0.0.1:\d+"):
        prepare(_bucket_config(tmp_path))


def test_source_and_root_must_both_be_in_the_bucket_one_inside_the_other(tmp_path, shards):
    with pytest.raises(DsmdError, match="need both to be s3:// URLs"):
        prepare(_bucket_config(tmp_path, images_root=str(shards)))
    with pytest.raises(DsmdError, match="is not inside data.images_root s3://shards/other"):
        prepare(_bucket_config(tmp_path, images_root="s3://shards/other"))
    with pytest.raises(DsmdError, match="no .tar shards under this prefix"):
        prepare(_bucket_config(tmp_path, source="s3://shards/empty", images_root="s3://shards"))


def test_in_order_reads_take_each_shard_whole_through_the_cache_once(tmp_path, shards, monkeypatch):
    """A scan given the local shard cache downloads each shard once and reads no image by a ranged GET; without
    it every image is one ranged GET. A shard rewritten with the same size is caught by its sha256."""
    import s3fs

    from pipeline.data import bucket

    ranged = []
    real_range = bucket.read_range
    monkeypatch.setattr(bucket, "read_range", lambda *a: ranged.append(a) or real_range(*a))
    directory = prepare(_bucket_config(tmp_path))
    scan = CanonicalScan(directory)
    scan.use_shard_cache(bucket.local_shard_cache(str(tmp_path / "cache"), 1.0))
    cached = check_dataset(scan, workers=4, progress=False, write=False)
    copies = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert sorted(p.name.split("-")[0] for p in copies) == ["00000.tar", "00001.tar"] and ranged == []
    plain = check_dataset(CanonicalScan(directory), workers=4, progress=False, write=False)
    assert len(ranged) == 5  # one per image
    assert plain.to_dict() == cached.to_dict()

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    data = bytearray((shards / "00001.tar").read_bytes())
    data[-1024] ^= 0xFF  # same size, other bytes: the size check on opening cannot see it
    fs.pipe_file(f"{BUCKET[len('s3://'):]}/00001.tar", bytes(data))
    again = CanonicalDataset.load(directory)
    again.use_shard_cache(bucket.local_shard_cache(str(tmp_path / "other-cache"), 1.0), in_order=True)
    with pytest.raises(ShardError, match=rf"^{BUCKET}/00001.tar: the shard changed since it was prepared"):
        again.image_source(3).read()


def test_a_bucket_shard_that_is_not_a_tar_is_one_line_naming_its_url(tmp_path, shards):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(f"{BUCKET[len('s3://'):]}/00002.tar", b"not a tar at all" * 64)
    try:
        with pytest.raises(ShardError, match=rf"^{BUCKET}/00002.tar: not a tar file") as caught:
            prepare(_bucket_config(tmp_path))
        assert ".download-" not in str(caught.value)
    finally:
        fs.rm_file(f"{BUCKET[len('s3://'):]}/00002.tar")
