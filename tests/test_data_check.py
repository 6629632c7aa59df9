"""The dataset check: every bad image is found with its reason, caption warnings, the bad-image list."""

import json

import pyarrow.parquet as pq
import pytest
from data_helpers import (
    data_config,
    jpeg_bytes,
    karpathy_entry,
    write_karpathy,
    write_png,
    write_png_header,
    write_truncated_jpeg,
)

from pipeline.data.canonical import CanonicalDataset, prepare_dataset
from pipeline.data.check import check_dataset, load_bad_images
from pipeline.errors import DsmdError


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "images"
    write_png(root / "good.png")
    (root / "good.jpg").write_bytes(jpeg_bytes())
    write_truncated_jpeg(root / "cut.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "junk.jpg").write_bytes(b"<html>not found</html>")
    long_caption = " ".join(["word"] * 70)
    entries = [
        karpathy_entry("good.png", "train", ["a photo", "a photo", "common text"], imgid=0),
        karpathy_entry("cut.jpg", "train", ["common text"], imgid=1),
        karpathy_entry("gone.jpg", "test", ["same in test"], imgid=2),
        karpathy_entry("empty.jpg", "test", ["Same  in TEST", long_caption], imgid=3),
        karpathy_entry("junk.jpg", "val", [""], imgid=4),
        karpathy_entry("good.jpg", "val", ["fine"], imgid=5),
    ]
    source = write_karpathy(tmp_path / "k.json", entries)
    return prepare_dataset(data_config(tmp_path, source)), tmp_path


def test_every_bad_image_is_reported_with_its_reason(messy):
    ds, tmp_path = messy
    report = check_dataset(ds, workers=2, progress=False)
    assert [(b.image_id, b.path, b.reason) for b in report.bad_images] == [
        (1, "cut.jpg", "truncated image data"),
        (2, "gone.jpg", "missing file"),
        (3, "empty.jpg", "empty file (0 bytes)"),
        (4, "junk.jpg", "not an image file (unknown or corrupt format)"),
    ]
    assert report.num_good_images == 2
    assert report.images_without_captions == [4]
    assert [d["where"] for d in report.dropped] == ["images[4].sentences[0]"]


def test_caption_warnings(messy):
    ds, _ = messy
    report = check_dataset(ds, progress=False, write=False)
    kinds = {(w.caption_id, w.kind) for w in report.caption_warnings}
    # caption 1 repeats caption 0 of the same image; "same in test" is on two test images (case and spaces
    # do not matter); caption 6 is long. "common text" on two train images is normal and not reported.
    assert kinds == {(1, "duplicate_in_image"), (4, "shared_across_images"), (6, "long")}
    assert report.warning_counts() == {"duplicate_in_image": 1, "long": 1, "shared_across_images": 1}


def test_bad_image_list_is_written_and_read_back(messy):
    ds, tmp_path = messy
    check_dataset(ds, progress=False)
    directory = tmp_path / "canonical"
    assert load_bad_images(directory) == {
        1: "truncated image data",
        2: "missing file",
        3: "empty file (0 bytes)",
        4: "not an image file (unknown or corrupt format)",
    }
    table = pq.read_table(directory / "bad_images.parquet")
    assert table.schema.metadata[b"dsmd_fingerprint"].decode() == ds.fingerprint
    summary = json.loads((directory / "check_report.json").read_text())
    assert summary["num_bad_images"] == 4 and summary["fingerprint"] == ds.fingerprint
    # A loaded dataset sees the same list.
    assert load_bad_images(CanonicalDataset.load(directory).directory) == load_bad_images(directory)


def test_no_check_yet_means_no_known_bad_images(messy):
    _, tmp_path = messy
    assert load_bad_images(tmp_path / "canonical") == {}


def test_a_list_for_other_content_is_refused(messy):
    ds, tmp_path = messy
    check_dataset(ds, progress=False)
    card_path = tmp_path / "canonical" / "dataset.json"
    card = json.loads(card_path.read_text())
    card["fingerprint"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(DsmdError, match="rerun `dsmd data check`"):
        load_bad_images(tmp_path / "canonical")


def test_all_good_dataset(tmp_path):
    write_png(tmp_path / "images" / "a.png")
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry("a.png", "test", ["x"], imgid=0)])
    report = check_dataset(prepare_dataset(data_config(tmp_path, source)), workers=1, progress=False)
    assert report.bad_images == [] and report.caption_warnings == []
    assert load_bad_images(tmp_path / "canonical") == {}


def test_image_too_large_to_decode_is_recorded_as_bad_without_decoding(tmp_path):
    root = tmp_path / "images"
    write_png(root / "a.png")
    write_png_header(root / "huge16.png", 9400, 9400, bit_depth=16, colour_type=0)
    entries = [karpathy_entry("a.png", "test", ["x"], imgid=0), karpathy_entry("huge16.png", "test", ["y"], imgid=1)]
    ds = prepare_dataset(data_config(tmp_path, write_karpathy(tmp_path / "k.json", entries)))
    # A decode budget smaller than one image: each then decodes alone, and the check still finishes.
    report = check_dataset(ds, workers=4, progress=False, decode_memory=1)
    reason = "too large to decode: 9400 x 9400 pixels of mode I;16 need about 506 MiB (limit 384 MiB)"
    assert [(b.image_id, b.reason) for b in report.bad_images] == [(1, reason)]
    assert load_bad_images(tmp_path / "canonical") == {1: reason}


def test_the_image_scan_reads_ahead_a_bounded_number_of_images_in_order():
    """Executor.map would submit every image at once (a future held per image); the scan keeps at most
    ``ahead`` submitted and unread, and yields in order."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.check import _bounded_map

    pulled = 0

    def ids():
        nonlocal pulled
        for i in range(200):
            pulled += 1
            yield i

    out = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        for value in _bounded_map(pool, lambda i: i * i, ids(), ahead=6):
            assert pulled - len(out) <= 6
            out.append(value)
    assert out == [i * i for i in range(200)]
