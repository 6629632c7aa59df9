"""WebDataset / img2dataset shards as a data source: prepare indexes the tars, check decodes every member in
place, and bad members, truncated and missing shards are recorded or refused as the module notes say."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from data_helpers import data_config, jpeg_bytes
from PIL import Image
from wds_helpers import png_bytes, write_shard

from pipeline.data.canonical import CanonicalDataset, prepare_dataset
from pipeline.data.check import check_dataset, load_bad_images
from pipeline.data.images import BadImageError, load_rgb
from pipeline.data.shards import ShardError
from pipeline.data.webdataset import hash_split
from pipeline.errors import DsmdError


def _sample(key, image=None, ext="jpg", caption=None, **meta):
    sample = {"__key__": key, ext: image if image is not None else jpeg_bytes(seed=int(key[-2:]))}
    if caption is not None:
        sample["txt"] = caption
    sample["json"] = {"key": key, **meta}
    return sample


@pytest.fixture
def img2dataset(tmp_path):
    """Two shards: six samples, one of them a cut-off JPEG, one without any caption, one whose caption is in
    its json only, and a failed download listed in the second shard's table."""
    root = tmp_path / "wds"
    corrupt = jpeg_bytes(seed=1)
    write_shard(
        root / "00000.tar",
        [
            _sample("000000000", caption="a red square", split="train"),
            _sample("000000001", image=corrupt[: len(corrupt) // 2], caption="cut short", split="train"),
            _sample("000000002", image=png_bytes(), ext="png", split="val"),  # no .txt, no json caption
            _sample("000000003", caption="a blue circle", split="test"),
        ],
    )
    write_shard(
        root / "00001.tar",
        [
            _sample("000010000", caption="a green star", split="train"),
            {"__key__": "000010001", "jpg": jpeg_bytes(seed=11),
             "json": {"caption": "caption from the json", "split": "test"}},
        ],
        listed=[{"key": "000010002", "caption": "never came", "status": "failed_to_download",
                 "error_message": "HTTP 404"}],
    )
    return root


def test_prepare_and_check_record_exactly_the_corrupt_member_and_the_missing_caption(tmp_path, img2dataset):
    cfg = data_config(tmp_path, img2dataset, img2dataset)
    ds = prepare_dataset(cfg)

    assert ds.info["source"]["format"] == "webdataset"
    assert ds.images.column("key").to_pylist() == [
        "000000000", "000000001", "000000002", "000000003", "000010000", "000010001"]
    assert ds.images.column("path").to_pylist()[1:3] == ["00000.tar/000000001.jpg", "00000.tar/000000002.png"]
    assert ds.images.column("split").to_pylist() == ["train", "train", "val", "test", "train", "test"]
    assert ds.texts(ds.caption_ids()) == [
        "a red square", "cut short", "a blue circle", "a green star", "caption from the json"]
    assert ds.caption_image_ids().tolist() == [0, 1, 3, 4, 5]
    assert ds.dropped == [{"where": "shard 00000.tar, sample '000000002'", "reason": "caption is missing (null)",
                           "image_key": "000000002"}]
    assert ds.info["webdataset"] == {"shards": 2, "truncated_shards": [], "not_downloaded": 1,
                                     "missing_from_tar": 0}

    loaded = CanonicalDataset.load(cfg.canonical_dir)
    assert loaded.fingerprint == ds.fingerprint
    report = check_dataset(loaded, workers=2, progress=False)
    assert [(b.image_id, b.path, b.reason) for b in report.bad_images] == [
        (1, "00000.tar/000000001.jpg", "truncated image data")]
    assert report.images_without_captions == [2]
    assert load_bad_images(cfg.canonical_dir) == {1: "truncated image data"}

    # Read in place, the member gives exactly the pixels of the bytes written.
    expected = np.asarray(Image.open(io.BytesIO(jpeg_bytes(seed=0))).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_rgb(loaded.image_source(0))), expected)
    assert np.asarray(load_rgb(loaded.image_source(2))).shape == (8, 8, 3)
    assert not any(p.suffix in (".jpg", ".png") for p in img2dataset.rglob("*")), "nothing was unpacked"


def test_the_tar_index_points_at_each_members_bytes(tmp_path, img2dataset):
    ds = prepare_dataset(data_config(tmp_path, img2dataset, img2dataset))
    with tarfile.open(img2dataset / "00001.tar") as archive:
        expected = archive.extractfile("000010000.jpg").read()
    assert ds.image_source(4).read() == expected
    with pytest.raises(BadImageError, match="too large: a member of"):
        load_rgb(ds.image_source(4), max_decode_bytes=len(expected) - 1)  # refused before reading it


def test_a_truncated_shard_records_the_cut_member_and_the_ones_lost_after_it(tmp_path):
    root = tmp_path / "wds"
    shard = write_shard(root / "00000.tar", [_sample(f"0000000{i:02d}", caption=f"c{i}", split="train")
                                             for i in range(4)])
    with tarfile.open(shard) as archive:
        cut_at = archive.getmember("000000002.jpg").offset_data + 100
    with open(shard, "r+b") as handle:
        handle.truncate(cut_at)

    # The cut takes sample 2's json (and its split) with it: the split falls back to data.default_split.
    ds = prepare_dataset(data_config(tmp_path, root, root, default_split="train"))
    assert ds.images.column("key").to_pylist() == ["000000000", "000000001", "000000002", "000000003"]
    assert ds.info["webdataset"]["truncated_shards"] == ["00000.tar"]
    assert ds.info["webdataset"]["missing_from_tar"] == 1
    # Sample 2 lost its .txt with the cut; sample 3 is known from the shard's table, caption included.
    assert [d["image_key"] for d in ds.dropped] == ["000000002"]
    assert ds.texts(ds.caption_ids()) == ["c0", "c1", "c3"]

    report = check_dataset(ds, workers=1, progress=False)
    bad = {b.image_id: b.reason for b in report.bad_images}
    assert set(bad) == {2, 3}
    assert bad[2].startswith("truncated shard: 100 of ")
    assert bad[3] == "missing from shard 00000.tar (listed as downloaded)"


def test_split_by_a_hash_of_the_key_is_stable_and_near_the_fractions(tmp_path):
    root = tmp_path / "wds"
    tiny = png_bytes(size=(2, 2))
    keys = [f"{i:09d}" for i in range(400)]
    write_shard(root / "00000.tar", [{"__key__": k, "png": tiny, "txt": f"caption {k}"} for k in keys])
    with pytest.raises(DsmdError, match="no split .*hash_split_val"):
        prepare_dataset(data_config(tmp_path, root, root))

    ds = prepare_dataset(data_config(tmp_path, root, root, hash_split_val=0.1, hash_split_test=0.2))
    splits = ds.images.column("split").to_pylist()
    assert splits == [hash_split(k, 0.1, 0.2) for k in keys]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    # 400 draws: within five standard deviations of 40 / 80 / 280.
    assert abs(counts["val"] - 40) < 30 and abs(counts["test"] - 80) < 40 and counts["train"] > 220
    # The rule is the documented one: sha256 of the key, first 8 bytes over 2**64.
    import hashlib

    position = int.from_bytes(hashlib.sha256(b"000000007").digest()[:8], "big") / 2**64
    assert hash_split("000000007", 0.1, 0.2) == ("test" if position < 0.2 else "val" if position < 0.3 else "train")

    with pytest.raises(DsmdError, match="leaves no training data"):
        prepare_dataset(data_config(tmp_path, root, root, hash_split_val=0.5, hash_split_test=0.5))


def test_a_missing_or_rewritten_shard_is_one_line_naming_it(tmp_path, img2dataset):
    cfg = data_config(tmp_path, img2dataset, img2dataset)
    prepare_dataset(cfg)
    shard = img2dataset / "00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data + b"\0" * 512)
    with pytest.raises(ShardError, match=r"00001.tar: shard is .* bytes but was .* when indexed") as info:
        CanonicalDataset.load(cfg.canonical_dir)
    assert "\n" not in str(info.value)
    shard.unlink()
    with pytest.raises(ShardError, match=r"00001.tar: shard missing"):
        CanonicalDataset.load(cfg.canonical_dir)

    # Through the CLI: one line, exit 2.
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    result = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "--params", str(params),
         "--set", f"data.canonical_dir={cfg.canonical_dir}", "data", "info"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "00001.tar: shard missing" in lines[0], result.stderr


def test_bad_shards_are_refused_naming_the_file(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    (root / "00000.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match=r"00000.tar: not a tar file"):
        prepare_dataset(data_config(tmp_path, root, root, default_split="train"))

    gz = tmp_path / "gz"
    write_shard(gz / "00000.tar", [_sample("000000000", caption="x")])
    import gzip

    (gz / "00000.tar").write_bytes(gzip.compress((gz / "00000.tar").read_bytes()))
    with pytest.raises(ShardError, match="compressed shard"):
        prepare_dataset(data_config(tmp_path, gz, gz, default_split="train"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DsmdError, match="no .tar shards"):
        prepare_dataset(data_config(tmp_path, empty, empty, default_split="train"))


def test_shards_stay_under_the_images_root(tmp_path):
    outside = tmp_path / "elsewhere"
    write_shard(outside / "00000.tar", [_sample("000000000", caption="x", split="train")])
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DsmdError, match="outside the images root"):
        prepare_dataset(data_config(tmp_path, outside, root))
    # A symlinked shard that leads out of the root is refused too.
    (root / "00000.tar").symlink_to(outside / "00000.tar")
    with pytest.raises(DsmdError, match="outside the images root"):
        prepare_dataset(data_config(tmp_path, root, root))


def test_a_member_name_leaving_the_shard_is_refused(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as archive:
        for name, data in (("../../evil.jpg", jpeg_bytes()), ("../../evil.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with pytest.raises(DsmdError, match=r"'\.\.' to leave the images root"):
        prepare_dataset(data_config(tmp_path, root, root, default_split="train"))


def test_a_key_in_two_shards_is_refused(tmp_path):
    root = tmp_path / "wds"
    write_shard(root / "00000.tar", [_sample("000000000", caption="x", split="train")])
    write_shard(root / "00001.tar", [_sample("000000000", caption="y", split="train")])
    with pytest.raises(DsmdError, match=r"00001.tar, sample '000000000'.*appears twice"):
        prepare_dataset(data_config(tmp_path, root, root))


def test_up_to_date_follows_the_shards(tmp_path, img2dataset):
    from pipeline.data.canonical import is_up_to_date

    cfg = data_config(tmp_path, img2dataset, img2dataset)
    prepare_dataset(cfg)
    assert is_up_to_date(cfg)
    write_shard(img2dataset / "00002.tar", [_sample("000020000", caption="new", split="train")])
    assert not is_up_to_date(cfg)
    card = json.loads((tmp_path / "canonical" / "dataset.json").read_text())
    assert card["source"]["settings"]["hash_split_val"] == 0.0


def test_dsmd_data_check_on_a_shard_directory(tmp_path, img2dataset):
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    settings = ["--params", str(params), "--set", f"data.source={img2dataset}",
                "--set", f"data.images_root={img2dataset}", "--set", f"data.canonical_dir={tmp_path / 'canonical'}"]
    result = CliRunner().invoke(app, [*settings, "data", "check"])
    assert result.exit_code == 0, result.output
    assert "00000.tar/000000001.jpg" in result.output and "truncated image data" in result.output
    assert "caption is missing" in result.output and "1 bad images" in result.output
    result = CliRunner().invoke(app, [*settings, "data", "info"])
    assert "WebDataset: 2 shards" in result.output and "1 samples never downloaded" in result.output


def test_a_json_list_of_captions_gives_each_its_own_caption_row(tmp_path):
    """COCO-style samples: the json's caption field holds several captions; each is a pair with the image; a
    blank one among them is recorded by its position, an empty list as a missing caption."""
    root = tmp_path / "wds"
    write_shard(root / "00000.tar", [
        {"__key__": "000000000", "jpg": jpeg_bytes(seed=0),
         "json": {"caption": ["a red square", "  a square, red ", ""], "split": "train"}},
        {"__key__": "000000001", "jpg": jpeg_bytes(seed=1), "json": {"caption": [], "split": "train"}},
        {"__key__": "000000002", "jpg": jpeg_bytes(seed=2), "txt": "the .txt wins",
         "json": {"caption": ["not this"], "split": "val"}},
    ])
    ds = prepare_dataset(data_config(tmp_path, root, root))
    assert ds.texts(ds.caption_ids()) == ["a red square", "a square, red", "the .txt wins"]
    assert ds.caption_image_ids().tolist() == [0, 0, 2]
    assert [(d["where"], d["reason"]) for d in ds.dropped] == [
        ("shard 00000.tar, sample '000000000', caption 2", "empty caption"),
        ("shard 00000.tar, sample '000000001'", "caption is missing (null)"),
    ]
