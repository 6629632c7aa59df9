"""The bounded-memory passes over a dataset: records grouped through disk (SpilledGroups), the fingerprint
computed from the files, WebDataset prepared shard by shard, and the check run on a CanonicalScan. Each is
compared with the plain in-memory way it must agree with, with batches, row groups and spill buffers made tiny
so that every boundary is crossed."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import data_config, jpeg_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from wds_helpers import write_shard

from pipeline.data import webdataset
from pipeline.data.canonical import CanonicalDataset, prepare
from pipeline.data.check import check_dataset
from pipeline.data.fingerprint import fingerprint_files, fingerprint_tables
from pipeline.data.scan import CanonicalScan
from pipeline.data.spill import SpilledGroups
from pipeline.data.streamed import write_streamed
from pipeline.errors import DsmdError

RECORD = np.dtype([("hash", "<u8"), ("payload", "<i8")])
# Few distinct hashes, spread over the top bits (which pick the bucket) and equal in them (which do not).
HASHES = [0, 1, 2**63, 2**63 + 1, 2**64 - 1, 0x0123456789ABCDEF]


@settings(max_examples=150, deadline=None)
@given(hashes=st.lists(st.sampled_from(HASHES), max_size=60), chunk=st.integers(1, 7),
       buffer_rows=st.integers(1, 20), buckets=st.sampled_from([1, 2, 4, 256]))
def test_spilled_groups_hand_out_every_record_once_with_equal_hashes_together(tmp_path_factory, hashes, chunk,
                                                                             buffer_rows, buckets):
    records = np.zeros(len(hashes), RECORD)
    records["hash"] = np.asarray(hashes, dtype=np.uint64)
    records["payload"] = np.arange(len(hashes))
    with SpilledGroups(RECORD, tmp_path_factory.mktemp("spill"), buckets=buckets, buffer_rows=buffer_rows) as g:
        for start in range(0, len(records), chunk):
            g.add(records[start : start + chunk])
        groups = list(g.groups())
    where = {}
    seen = defaultdict(list)
    for number, group in enumerate(groups):
        assert np.all(np.diff(group["hash"].astype(np.float64)) >= 0) or len(group) < 2
        for value, payload in zip(group["hash"].tolist(), group["payload"].tolist(), strict=True):
            assert where.setdefault(value, number) == number  # a hash never spans two groups
            seen[value].append(payload)
    expected = defaultdict(list)
    for payload, value in enumerate(hashes):
        expected[value].append(payload)  # arrival order kept within a hash
    assert dict(seen) == dict(expected)


def test_spilled_groups_leave_nothing_on_disk(tmp_path):
    with SpilledGroups(RECORD, tmp_path, buffer_rows=2) as groups:
        groups.add(np.zeros(5, RECORD))
        assert any(tmp_path.iterdir())  # spilled
        assert sum(len(g) for g in groups.groups()) == 5
    assert not any(tmp_path.iterdir())


TEXT = st.text(alphabet=st.sampled_from(["a", "é", "\u00a0", "猫", " ", "\n"]), max_size=6)


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(TEXT, min_size=1, max_size=9), texts=st.lists(TEXT, max_size=12), data=st.data())
def test_fingerprint_of_the_files_equals_that_of_the_tables(tmp_path_factory, keys, texts, data):
    n = len(keys)
    images = pa.table({"image_id": np.arange(n), "key": keys, "path": [f"{k}.jpg" for k in keys],
                       "split": ["train"] * n})
    owners = data.draw(st.lists(st.integers(0, n - 1), min_size=len(texts), max_size=len(texts)))
    captions = pa.table({"caption_id": np.arange(len(texts)), "image_id": pa.array(owners, pa.int64()),
                         "text": pa.array(texts, pa.string()), "split": ["train"] * len(texts)})
    directory = tmp_path_factory.mktemp("fp")
    group, batch = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    pq.write_table(images, directory / "i.parquet", row_group_size=group)
    pq.write_table(captions, directory / "c.parquet", row_group_size=group)
    streamed = fingerprint_files(directory / "i.parquet", directory / "c.parquet", "here", batch_rows=batch)
    assert streamed == (fingerprint_tables(images, captions), n, len(texts))


def test_fingerprint_of_the_files_refuses_broken_invariants(tmp_path):
    images = pa.table({"image_id": [0, 2], "key": ["a", "b"], "path": ["a", "b"], "split": ["train"] * 2})
    captions = pa.table({"caption_id": [0], "image_id": [5], "text": ["x"], "split": ["train"]})
    pq.write_table(images, tmp_path / "i.parquet")
    pq.write_table(captions, tmp_path / "c.parquet")
    with pytest.raises(DsmdError, match="here: ids are not dense"):
        fingerprint_files(tmp_path / "i.parquet", tmp_path / "c.parquet", "here")
    pq.write_table(images.set_column(0, "image_id", pa.array([0, 1])), tmp_path / "i.parquet")
    with pytest.raises(DsmdError, match="here: a caption points at an image id that does not exist"):
        fingerprint_files(tmp_path / "i.parquet", tmp_path / "c.parquet", "here")


def _sample(key, caption, split, image=None):
    return {"__key__": key, "jpg": image if image is not None else jpeg_bytes(seed=int(key)),
            "txt": caption, "json": {"split": split}}


@pytest.fixture
def shards(tmp_path):
    """Three shards with a bad member, a blank caption, a caption repeated in one image's shard and a text
    shared by two test images in different shards."""
    root = tmp_path / "wds"
    cut = jpeg_bytes(seed=3)
    write_shard(root / "00000.tar", [_sample("100", "a red square", "train"), _sample("101", "shared", "test"),
                                     _sample("102", "cut", "train", image=cut[: len(cut) // 2])])
    write_shard(root / "00001.tar", [_sample("200", " ", "val"), _sample("201", "Shared ", "test")])
    write_shard(root / "00002.tar", [_sample("300", "a red square", "train"), _sample("301", "x", "val")])
    return root


def _stream(cfg, directory, **sizes):
    """What `prepare` does for a WebDataset source, with the sizes given."""
    directory.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.images_root)
    return write_streamed(webdataset.iter_shards(Path(cfg.source), root, cfg), directory, name=cfg.name,
                          source=Path(cfg.source), images_root=root.resolve(),
                          info={"source": {"format": "webdataset"}}, **sizes)


def test_streamed_prepare_does_not_depend_on_row_groups_or_spilling(tmp_path, shards):
    cfg = data_config(tmp_path, shards, shards)
    reference = CanonicalDataset.load(prepare(cfg))
    card = _stream(cfg, tmp_path / "tiny", row_group=1, spill_rows=1)
    tiny = CanonicalDataset.load(tmp_path / "tiny")
    assert card["fingerprint"] == reference.fingerprint == tiny.fingerprint
    assert tiny.images.equals(reference.images) and tiny.captions.equals(reference.captions)
    assert tiny.tar_index.to_table().equals(reference.tar_index.to_table())
    assert card["counts"] == reference.counts()
    assert reference.images.column("key").to_pylist() == ["100", "101", "102", "200", "201", "300", "301"]
    assert [d["image_key"] for d in reference.dropped] == ["200"]  # the blank caption
    assert not list((tmp_path / "tiny").glob(".*"))  # no staged files or spill left behind


def test_a_repeated_key_is_found_after_spilling_and_names_both_shards(tmp_path, shards):
    write_shard(shards / "00003.tar", [_sample("201", "again", "train")])
    cfg = data_config(tmp_path, shards, shards)
    with pytest.raises(DsmdError, match=r"shard 00003.tar, sample '201': .*appears twice \(first in shard "
                                        r"00001.tar\)"):
        _stream(cfg, tmp_path / "tiny", spill_rows=1)
    assert not list((tmp_path / "tiny").iterdir())  # nothing staged is left


def test_check_on_a_scan_equals_check_in_memory(tmp_path, shards):
    cfg = data_config(tmp_path, shards, shards)
    directory = prepare(cfg)
    in_memory = check_dataset(CanonicalDataset.load(directory), workers=2, progress=False, write=False)
    scan = CanonicalScan(directory)
    streamed = check_dataset(scan, workers=2, progress=False, spill_rows=1)
    assert streamed.to_dict() == in_memory.to_dict()
    assert [(b.image_id, b.path) for b in streamed.bad_images] == [(2, "00000.tar/102.jpg")]
    assert {w.kind for w in streamed.caption_warnings} == {"shared_across_images"}
    assert streamed.images_without_captions == [3] and scan.image_relpaths([3, 0]) == ["00001.tar/200.jpg",
                                                                                     "00000.tar/100.jpg"]
    report = json.loads((directory / "check_report.json").read_text())
    assert report["num_bad_images"] == 1


def test_a_scan_refuses_tables_that_do_not_match_the_card(tmp_path, shards):
    directory = prepare(data_config(tmp_path, shards, shards))
    captions = pq.read_table(directory / "captions.parquet")
    texts = captions.column("text").to_pylist()
    pq.write_table(captions.set_column(2, "text", pa.array(["changed"] + texts[1:])), directory / "captions.parquet")
    with pytest.raises(DsmdError, match="do not match the fingerprint"):
        CanonicalScan(directory)
