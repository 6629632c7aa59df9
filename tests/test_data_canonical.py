"""The canonical dataset: dense ids, split queries, save/load, fingerprint, path checks, reuse."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import data_config, karpathy_entry, small_images, write_karpathy
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.canonical import (
    CanonicalDataset,
    fingerprint_tables,
    load_or_prepare,
    prepare_dataset,
)
from pipeline.errors import DsmdError

ENTRIES = [
    karpathy_entry("a.jpg", "train", ["a one", "a two"], imgid=0),
    karpathy_entry("b.jpg", "test", ["b one"], imgid=1),
    karpathy_entry("c.jpg", "val", ["c one", "c two", "c three"], imgid=2),
    karpathy_entry("d.jpg", "test", ["d one"], imgid=3),
]


@pytest.fixture
def setup(tmp_path):
    small_images(tmp_path / "images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    source = write_karpathy(tmp_path / "k.json", ENTRIES)
    return tmp_path, source


def test_ids_and_queries(setup):
    tmp_path, source = setup
    ds = prepare_dataset(data_config(tmp_path, source))
    assert ds.num_images == 4 and ds.num_captions == 7
    assert ds.image_ids().tolist() == [0, 1, 2, 3]
    assert ds.image_ids("test").tolist() == [1, 3]
    assert ds.caption_ids("test").tolist() == [2, 6]
    assert ds.caption_ids("val").tolist() == [3, 4, 5]
    assert ds.image_ids("train").dtype == np.int64 and ds.caption_ids().dtype == np.int64
    assert ds.caption_image_ids().tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert ds.texts(np.array([6, 0])) == ["d one", "a one"]
    assert ds.image_path(2) == (tmp_path / "images" / "c.jpg").resolve()
    assert ds.split_of_image(3) == "test"
    with pytest.raises(DsmdError):
        ds.image_ids("training")
    with pytest.raises(DsmdError):
        ds.image_path(4)
    with pytest.raises(DsmdError):
        ds.texts([7])


def test_save_and_load_round_trip(setup):
    tmp_path, source = setup
    ds = prepare_dataset(data_config(tmp_path, source))
    directory = tmp_path / "canonical"
    assert sorted(p.name for p in directory.iterdir()) == ["captions.parquet", "dataset.json", "images.parquet"]
    card = json.loads((directory / "dataset.json").read_text())
    assert card["schema_version"] == 1 and card["name"] == "test"
    assert card["fingerprint"] == ds.fingerprint and len(card["fingerprint"]) == 64
    assert card["images_root"] == str((tmp_path / "images").resolve())
    assert card["counts"]["images"] == 4 and card["counts"]["splits"]["test"] == {"images": 2, "captions": 2}
    assert card["source"]["path"] == str(source.resolve()) and card["source"]["format"] == "karpathy"
    assert card["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    loaded = CanonicalDataset.load(directory)
    assert loaded.fingerprint == ds.fingerprint
    assert loaded.images.equals(ds.images) and loaded.captions.equals(ds.captions)
    assert loaded.name == "test" and loaded.images_root == ds.images_root
    assert loaded.directory == directory


def test_load_with_another_images_root(setup):
    tmp_path, source = setup
    prepare_dataset(data_config(tmp_path, source))
    moved = tmp_path / "moved"
    (tmp_path / "images").rename(moved)
    loaded = CanonicalDataset.load(tmp_path / "canonical", images_root=moved)
    assert loaded.image_path(0) == (moved / "a.jpg").resolve()


def test_load_refuses_missing_or_tampered_directories(setup):
    tmp_path, source = setup
    with pytest.raises(DsmdError, match="dsmd data prepare"):
        CanonicalDataset.load(tmp_path / "nothing")
    prepare_dataset(data_config(tmp_path, source))
    captions_path = tmp_path / "canonical" / "captions.parquet"
    table = pq.read_table(captions_path)
    texts = table.column("text").to_pylist()
    texts[0] = "edited by hand"
    pq.write_table(table.set_column(2, "text", pa.array(texts)), captions_path)
    with pytest.raises(DsmdError, match="do not match the fingerprint"):
        CanonicalDataset.load(tmp_path / "canonical")


def test_fingerprint_is_stable_across_runs(setup):
    tmp_path, source = setup
    first = prepare_dataset(data_config(tmp_path, source)).fingerprint
    cfg = data_config(tmp_path, source)
    cfg.canonical_dir = str(tmp_path / "second")
    cfg.name = "another name"  # the name is not content
    assert prepare_dataset(cfg).fingerprint == first
    assert CanonicalDataset.load(tmp_path / "second").fingerprint == first


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e[1]["sentences"][0].update(raw="b uno"),  # a caption
        lambda e: e[1].update(split="val"),  # a split
        lambda e: e[1].update(imgid=17),  # an id (key)
        lambda e: e[1].update(filename="d.jpg") or e[3].update(filename="b.jpg"),  # paths
        lambda e: e.reverse(),  # order, hence ids
    ],
)
def test_fingerprint_changes_with_content(setup, change):
    tmp_path, source = setup
    before = prepare_dataset(data_config(tmp_path, source)).fingerprint
    entries = json.loads(json.dumps(ENTRIES))
    change(entries)
    write_karpathy(source, entries)
    assert prepare_dataset(data_config(tmp_path, source)).fingerprint != before


def reference_fingerprint(images: pa.Table, captions: pa.Table) -> str:
    """The fingerprint written out plainly: length-prefixed columns, int64 little-endian, strings as offsets
    (relative, int64) then bytes."""
    digest = hashlib.sha256(b"dsmd-canonical-v1")
    for table, names in (
        (images, ["image_id", "key", "path", "split"]),
        (captions, ["caption_id", "image_id", "text", "split"]),
    ):
        for name in names:
            values = table.column(name).to_pylist()
            digest.update(name.encode() + b"\x00" + len(values).to_bytes(8, "little"))
            if isinstance(values[0] if values else "", int):
                digest.update(b"".join(v.to_bytes(8, "little", signed=True) for v in values))
            else:
                encoded = [v.encode() for v in values]
                if encoded:
                    offsets = np.cumsum([0] + [len(b) for b in encoded]).astype("<i8")
                    digest.update(offsets.tobytes() + b"".join(encoded))
    return digest.hexdigest()


texts = st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=12)


@settings(max_examples=40, deadline=None)
@given(
    captions=st.lists(st.tuples(st.integers(0, 3), texts), min_size=0, max_size=20),
    cut=st.integers(0, 20),
)
def test_fingerprint_matches_reference_and_ignores_chunking(captions, cut):
    images = pa.table(
        {
            "image_id": np.arange(4, dtype=np.int64),
            "key": ["0", "1", "2", "ä"],
            "path": ["a.jpg", "b/ü.jpg", "c.jpg", "d.jpg"],
            "split": ["train", "val", "test", "test"],
        }
    )
    table = pa.table(
        {
            "caption_id": np.arange(len(captions), dtype=np.int64),
            "image_id": np.array([c[0] for c in captions], dtype=np.int64),
            "text": pa.array([c[1] for c in captions], pa.string()),
            "split": pa.array([["train", "val", "test", "test"][c[0]] for c in captions], pa.string()),
        }
    )
    expected = reference_fingerprint(images, table)
    assert fingerprint_tables(images, table) == expected
    # The same content split into chunks (and sliced buffers) hashes the same.
    cut = min(cut, len(captions))
    chunked = pa.concat_tables([table.slice(0, cut), table.slice(cut)])
    assert fingerprint_tables(images, chunked) == expected


def test_symlink_changed_after_prepare_is_refused_on_use(setup):
    tmp_path, source = setup
    ds = prepare_dataset(data_config(tmp_path, source))
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"x")
    (tmp_path / "images" / "a.jpg").unlink()
    os.symlink(outside, tmp_path / "images" / "a.jpg")
    with pytest.raises(DsmdError, match="outside the images root"):
        ds.image_path(0)


def test_load_or_prepare_reuses_until_something_changes(setup):
    tmp_path, source = setup
    cfg = data_config(tmp_path, source)
    first, prepared = load_or_prepare(cfg)
    assert prepared
    again, prepared = load_or_prepare(cfg)
    assert not prepared and again.fingerprint == first.fingerprint
    entries = json.loads(json.dumps(ENTRIES))
    entries[0]["sentences"].append({"raw": "a three"})
    write_karpathy(source, entries)
    changed, prepared = load_or_prepare(cfg)
    assert prepared and changed.num_captions == 8
    cfg.name = "renamed"
    assert load_or_prepare(cfg)[1]


def test_stale_check_results_are_removed_when_content_changes(setup):
    tmp_path, source = setup
    cfg = data_config(tmp_path, source)
    prepare_dataset(cfg)
    stale = tmp_path / "canonical" / "bad_images.parquet"
    stale.write_bytes(b"old")
    prepare_dataset(cfg)  # same content: the check still holds
    assert stale.exists()
    entries = json.loads(json.dumps(ENTRIES))
    entries[0]["sentences"][0]["raw"] = "changed"
    write_karpathy(source, entries)
    prepare_dataset(cfg)
    assert not stale.exists()


@pytest.mark.parametrize("below", ["", "sub"])
def test_canonical_dir_that_is_a_file_is_refused_before_the_source_is_read(setup, below):
    tmp_path, _ = setup
    in_the_way = tmp_path / "taken"
    in_the_way.write_text("not a directory")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')  # reading it would fail with another message
    cfg = dataclasses.replace(
        data_config(tmp_path, broken), canonical_dir=str(in_the_way / below if below else in_the_way)
    )
    with pytest.raises(DsmdError) as info:
        prepare_dataset(cfg)
    message = str(info.value)
    assert f"data.canonical_dir {cfg.canonical_dir!r}" in message and "not a directory" in message
    assert "set data.canonical_dir to a directory path" in message
    if below:
        assert f"lies under {str(in_the_way)!r}, which is a file" in message
    assert in_the_way.read_text() == "not a directory"
