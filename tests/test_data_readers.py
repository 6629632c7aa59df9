"""Source readers: Karpathy JSON and CSV / JSONL / Parquet tables, and every kind of bad row."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import data_config, karpathy_entry, small_images, write_karpathy

from pipeline.data.canonical import prepare_dataset
from pipeline.errors import DsmdError


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    small_images(images, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "train2014/x.jpg", "val2014/y.jpg"])
    return images


def prepare_error(cfg) -> str:
    with pytest.raises(DsmdError) as info:
        prepare_dataset(cfg)
    return str(info.value)


# ----------------------------------------------------------------------------------------- Karpathy


def test_karpathy_flickr_style(tmp_path, root):
    source = write_karpathy(
        tmp_path / "dataset_flickr30k.json",
        [
            karpathy_entry("a.jpg", "train", ["one", "two", "three"], imgid=0),
            karpathy_entry("b.jpg", "val", ["only one"], imgid=1),
            karpathy_entry("c.jpg", "test", ["x", "y", "z", "w", "v", "u", "t"], imgid=2),
        ],
    )
    ds = prepare_dataset(data_config(tmp_path, source))
    assert ds.images.column("key").to_pylist() == ["0", "1", "2"]
    assert ds.images.column("path").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.images.column("split").to_pylist() == ["train", "val", "test"]
    assert ds.num_captions == 11
    assert ds.caption_image_ids().tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2]
    assert ds.texts([0, 3, 10]) == ["one", "only one", "t"]
    assert ds.captions.column("split").to_pylist()[3] == "val"


def test_karpathy_coco_style_filepath_and_restval(tmp_path, root):
    source = write_karpathy(
        tmp_path / "dataset_coco.json",
        [
            karpathy_entry("x.jpg", "restval", ["a cat"], imgid=5, filepath="train2014"),
            karpathy_entry("y.jpg", "test", ["a dog"], imgid=9, filepath="val2014"),
        ],
    )
    ds = prepare_dataset(data_config(tmp_path, source))
    assert ds.images.column("path").to_pylist() == ["train2014/x.jpg", "val2014/y.jpg"]
    assert ds.images.column("split").to_pylist() == ["train", "test"]
    assert ds.image_path(0) == (root / "train2014" / "x.jpg").resolve()


def test_karpathy_tokens_when_raw_is_missing(tmp_path, root):
    entry = karpathy_entry("a.jpg", "train", [], imgid=0)
    entry["sentences"] = [{"tokens": ["a", "red", "ball"]}]
    ds = prepare_dataset(data_config(tmp_path, write_karpathy(tmp_path / "k.json", [entry])))
    assert ds.texts([0]) == ["a red ball"]


def test_empty_captions_are_dropped_and_recorded_and_image_stays(tmp_path, root):
    source = write_karpathy(
        tmp_path / "k.json",
        [
            karpathy_entry("a.jpg", "train", ["fine", "   ", ""], imgid=0),
            karpathy_entry("b.jpg", "test", [""], imgid=1),
        ],
    )
    ds = prepare_dataset(data_config(tmp_path, source))
    assert ds.num_images == 2  # b.jpg keeps its place in the gallery
    assert ds.texts(ds.caption_ids()) == ["fine"]
    assert [d["where"] for d in ds.dropped] == [
        "images[0].sentences[1]",
        "images[0].sentences[2]",
        "images[1].sentences[0]",
    ]
    assert {d["reason"] for d in ds.dropped} == {"empty caption"}
    card = json.loads((tmp_path / "canonical" / "dataset.json").read_text())
    assert len(card["dropped"]) == 3 and card["counts"]["dropped_rows"] == 3


def test_captions_are_stripped(tmp_path, root):
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry("a.jpg", "train", ["  two dogs \n"], imgid=0)])
    assert prepare_dataset(data_config(tmp_path, source)).texts([0]) == ["two dogs"]


def test_bad_json_names_file_and_line(tmp_path, root):
    source = tmp_path / "k.json"
    source.write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}')
    message = prepare_error(data_config(tmp_path, source))
    assert str(source) in message and "line 2" in message and "not valid JSON" in message


def test_not_a_karpathy_file(tmp_path, root):
    source = tmp_path / "k.json"
    source.write_text("[1, 2]")
    assert "not a Karpathy split file" in prepare_error(data_config(tmp_path, source))


@pytest.mark.parametrize(
    "broken, expected",
    [
        ({"split": "train", "sentences": []}, "missing field 'filename'"),
        ({"filename": "a.jpg", "sentences": []}, "missing field 'split'"),
        ({"filename": "a.jpg", "split": "train"}, "missing field 'sentences'"),
        ({"filename": 7, "split": "train", "sentences": []}, "field 'filename' must be str"),
        ({"filename": "a.jpg", "split": "holdout", "sentences": []}, "unknown split 'holdout'"),
        ({"filename": "a.jpg", "split": "train", "sentences": "text"}, "field 'sentences' must be list"),
        ({"filename": "a.jpg", "split": "train", "sentences": [{"raw": 5}]}, "caption must be a string"),
        ({"filename": "a.jpg", "split": "train", "sentences": [{"imgid": 1}]}, "neither 'raw'"),
    ],
)
def test_karpathy_bad_rows_name_file_and_row(tmp_path, root, broken, expected):
    good = karpathy_entry("b.jpg", "train", ["ok"], imgid=0)
    source = write_karpathy(tmp_path / "k.json", [good, broken])
    message = prepare_error(data_config(tmp_path, source))
    assert str(source) in message and "images[1]" in message
    assert expected in message


def test_duplicate_imgid_is_refused(tmp_path, root):
    source = write_karpathy(
        tmp_path / "k.json",
        [karpathy_entry("a.jpg", "train", ["x"], imgid=3), karpathy_entry("b.jpg", "train", ["y"], imgid=3)],
    )
    assert "image id '3' appears twice" in prepare_error(data_config(tmp_path, source))


# ------------------------------------------------------------------------------------- image paths


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "sub/../../outside.jpg", "a/../b.jpg"])
def test_dotdot_paths_are_refused(tmp_path, root, bad_path):
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry(bad_path, "train", ["x"], imgid=0)])
    message = prepare_error(data_config(tmp_path, source))
    assert "images[0]" in message and "'..'" in message and "data.images_root" in message


def test_absolute_path_outside_root_is_refused(tmp_path, root):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"x")
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry(str(outside), "train", ["x"], imgid=0)])
    message = prepare_error(data_config(tmp_path, source))
    assert "absolute image path" in message and "outside the images root" in message and "images[0]" in message


def test_absolute_path_inside_root_becomes_relative(tmp_path, root):
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry(str(root / "a.jpg"), "train", ["x"], imgid=0)])
    assert prepare_dataset(data_config(tmp_path, source)).images.column("path").to_pylist() == ["a.jpg"]


def test_symlink_escaping_the_root_is_refused(tmp_path, root):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.jpg").write_bytes(b"x")
    os.symlink(secret, root / "link")
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry("link/s.jpg", "train", ["x"], imgid=0)])
    message = prepare_error(data_config(tmp_path, source))
    assert "outside the images root" in message and "symlink" in message


def test_symlink_inside_the_root_is_fine(tmp_path, root):
    os.symlink(root / "train2014", root / "alias")
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry("alias/x.jpg", "train", ["x"], imgid=0)])
    assert prepare_dataset(data_config(tmp_path, source)).num_images == 1


def test_same_file_under_two_ids_is_refused(tmp_path, root):
    source = write_karpathy(
        tmp_path / "k.json",
        [karpathy_entry("a.jpg", "train", ["x"], imgid=0), karpathy_entry("./a.jpg", "train", ["y"], imgid=1)],
    )
    assert "already belongs to image id '0'" in prepare_error(data_config(tmp_path, source))


# ------------------------------------------------------------------------------------------ tables

ROWS = [
    {"image": "a.jpg", "caption": "first of a", "image_id": "10", "split": "train"},
    {"image": "b.jpg", "caption": "only b", "image_id": "11", "split": "test"},
    {"image": "a.jpg", "caption": "second of a", "image_id": "10", "split": "train"},
    {"image": "c.jpg", "caption": "", "image_id": "12", "split": "val"},
]


def write_csv(path, header, rows):
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_table(kind, tmp_path, rows):
    if kind == "csv":
        header = list(rows[0])
        return write_csv(tmp_path / "t.csv", header, [[r[h] for h in header] for r in rows])
    if kind == "jsonl":
        return write_jsonl(tmp_path / "t.jsonl", rows)
    return write_parquet(tmp_path / "t.parquet", rows)


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_tables_group_captions_by_image_id(tmp_path, root, kind):
    ds = prepare_dataset(data_config(tmp_path, write_table(kind, tmp_path, ROWS)))
    assert ds.images.column("key").to_pylist() == ["10", "11", "12"]
    assert ds.images.column("path").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.images.column("split").to_pylist() == ["train", "test", "val"]
    assert ds.texts(ds.caption_ids()) == ["first of a", "only b", "second of a"]
    assert ds.caption_image_ids().tolist() == [0, 1, 0]
    assert ds.image_ids("val").tolist() == [2]  # c.jpg lost its only caption but stays in the gallery
    assert len(ds.dropped) == 1 and ds.dropped[0]["reason"] == "empty caption"
    assert ds.dropped[0]["where"] == {"csv": "line 5", "jsonl": "line 4", "parquet": "row 4"}[kind]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_tables_without_image_id_group_by_path(tmp_path, root, kind):
    rows = [
        {"image": "a.jpg", "caption": "one", "split": "train"},
        {"image": "./a.jpg", "caption": "two", "split": "train"},
        {"image": "b.jpg", "caption": "three", "split": "test"},
    ]
    ds = prepare_dataset(data_config(tmp_path, write_table(kind, tmp_path, rows)))
    assert ds.images.column("key").to_pylist() == ["a.jpg", "b.jpg"]
    assert ds.caption_image_ids().tolist() == [0, 0, 1]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_table_without_split_needs_default_split(tmp_path, root, kind):
    rows = [{"image": "a.jpg", "caption": "one"}, {"image": "b.jpg", "caption": "two"}]
    source = write_table(kind, tmp_path, rows)
    message = prepare_error(data_config(tmp_path, source))
    assert "data.default_split" in message and str(source) in message
    ds = prepare_dataset(data_config(tmp_path, source, default_split="test"))
    assert ds.images.column("split").to_pylist() == ["test", "test"]


def test_blank_split_cell(tmp_path, root):
    source = write_csv(tmp_path / "t.csv", ["image", "caption", "split"], [["a.jpg", "x", "train"], ["b.jpg", "y", ""]])
    assert "line 3" in prepare_error(data_config(tmp_path, source))
    ds = prepare_dataset(data_config(tmp_path, source, default_split="val"))
    assert ds.images.column("split").to_pylist() == ["train", "val"]


def test_custom_column_names_and_tsv(tmp_path, root):
    source = tmp_path / "t.tsv"
    source.write_text("url\ttext\tpart\nb.jpg\ta caption, with a comma\tvalidation\n")
    ds = prepare_dataset(data_config(tmp_path, source, image_column="url", caption_column="text", split_column="part"))
    assert ds.texts([0]) == ["a caption, with a comma"]
    assert ds.images.column("split").to_pylist() == ["val"]


def test_csv_quoted_multiline_caption(tmp_path, root):
    source = tmp_path / "t.csv"
    source.write_text('image,caption,split\na.jpg,"two\nlines",train\n')
    assert prepare_dataset(data_config(tmp_path, source)).texts([0]) == ["two\nlines"]


def test_csv_missing_column(tmp_path, root):
    source = write_csv(tmp_path / "t.csv", ["img", "caption", "split"], [["a.jpg", "x", "train"]])
    message = prepare_error(data_config(tmp_path, source))
    assert "no column 'image'" in message and "'img'" in message and "data.image_column" in message


def test_csv_row_with_extra_or_missing_fields(tmp_path, root):
    source = tmp_path / "t.csv"
    source.write_text("image,caption,split\na.jpg,x,train\nb.jpg,y,train,extra\n")
    assert "line 3" in prepare_error(data_config(tmp_path, source))
    source.write_text("image,caption,split\na.jpg,x,train\nb.jpg\n")
    assert "line 3: fewer fields" in prepare_error(data_config(tmp_path, source))


def test_csv_empty_path_is_an_error(tmp_path, root):
    source = write_csv(tmp_path / "t.csv", ["image", "caption", "split"], [["a.jpg", "x", "train"], ["", "y", "train"]])
    assert "line 3: missing image path" in prepare_error(data_config(tmp_path, source))


def test_jsonl_bad_json_line(tmp_path, root):
    source = tmp_path / "t.jsonl"
    source.write_text('{"image": "a.jpg", "caption": "x", "split": "train"}\n\n{"image": "b.jpg", caption}\n')
    message = prepare_error(data_config(tmp_path, source))
    assert str(source) in message and "line 3" in message and "not valid JSON" in message


def test_jsonl_missing_caption_field_and_wrong_types(tmp_path, root):
    source = write_jsonl(tmp_path / "t.jsonl", [{"image": "a.jpg", "split": "train"}])
    assert "line 1: missing field 'caption'" in prepare_error(data_config(tmp_path, source))
    write_jsonl(source, [{"image": ["a.jpg"], "caption": "x", "split": "train"}])
    assert "line 1: column 'image' must hold str" in prepare_error(data_config(tmp_path, source))
    write_jsonl(
        source,
        [{"image": "a.jpg", "caption": "x", "split": "train"}, {"image": "b.jpg", "caption": 3, "split": "train"}],
    )
    assert "line 2: caption must be a string" in prepare_error(data_config(tmp_path, source))
    write_jsonl(source, ["just a string"])
    assert "line 1: expected a JSON object" in prepare_error(data_config(tmp_path, source))


def test_jsonl_integer_ids_and_null_caption(tmp_path, root):
    source = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"image": "a.jpg", "caption": "x", "image_id": 7, "split": "train"},
            {"image": "a.jpg", "caption": None, "image_id": 7, "split": "train"},
        ],
    )
    ds = prepare_dataset(data_config(tmp_path, source))
    assert ds.images.column("key").to_pylist() == ["7"]
    assert ds.dropped == [{"where": "line 2", "reason": "caption is missing (null)", "image_key": "7"}]


def test_parquet_wrong_column_type(tmp_path, root):
    source = write_parquet(tmp_path / "t.parquet", [{"image": "a.jpg", "caption": 5, "split": "train"}])
    assert "row 1: caption must be a string" in prepare_error(data_config(tmp_path, source))


def test_table_path_escaping_root(tmp_path, root):
    source = write_csv(
        tmp_path / "t.csv", ["image", "caption", "split"], [["a.jpg", "x", "train"], ["../../etc/passwd", "y", "train"]]
    )
    message = prepare_error(data_config(tmp_path, source))
    assert "line 3" in message and "'..'" in message


def test_conflicting_rows_of_one_image(tmp_path, root):
    rows = [
        {"image": "a.jpg", "caption": "x", "image_id": "1", "split": "train"},
        {"image": "b.jpg", "caption": "y", "image_id": "1", "split": "train"},
    ]
    assert "one id must always name the same file" in prepare_error(
        data_config(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows))
    )
    rows[1] = {"image": "a.jpg", "caption": "y", "image_id": "1", "split": "test"}
    assert "belong to the image's split" in prepare_error(
        data_config(tmp_path, write_jsonl(tmp_path / "t.jsonl", rows))
    )


def test_format_detection(tmp_path, root):
    source = tmp_path / "t.txt"
    source.write_text("image,caption,split\na.jpg,x,train\n")
    assert "data.format" in prepare_error(data_config(tmp_path, source))
    assert prepare_dataset(data_config(tmp_path, source, format="csv")).num_images == 1


def test_missing_source_and_root(tmp_path, root):
    assert "data.source" in prepare_error(data_config(tmp_path, tmp_path / "nope.json"))
    source = write_karpathy(tmp_path / "k.json", [karpathy_entry("a.jpg", "train", ["x"], imgid=0)])
    assert "data.images_root" in prepare_error(data_config(tmp_path, source, root=tmp_path / "no_images"))


def _with_latin1_byte(lines: list[str], bad_line: int, newline: str = "\n") -> bytes:
    """UTF-8 text whose line ``bad_line`` (from 1) holds a Latin-1 'é' (byte 0xe9) after 'caf'."""
    data = [line.encode() for line in lines]
    data[bad_line - 1] = data[bad_line - 1].replace(b"cafe", b"caf\xe9", 1)
    return newline.encode().join(data) + newline.encode()


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_csv_not_utf8_names_the_line_of_the_bad_byte(tmp_path, root, newline):
    # Far more than one decoding block (8 KiB) before the bad byte: the reader's own line count lags behind.
    lines = ["image,caption,split"] + [f"a.jpg,caption {n} of a cafe in town,train" for n in range(2, 601)]
    source = tmp_path / "t.csv"
    source.write_bytes(_with_latin1_byte(lines, 500, newline))
    message = prepare_error(data_config(tmp_path, source))
    assert message.startswith(f"{source}, line 500, column 27: not UTF-8 text (byte 0xe9")
    assert "save the file as UTF-8" in message


def test_csv_header_not_utf8(tmp_path, root):
    source = tmp_path / "t.csv"
    source.write_bytes(_with_latin1_byte(["image,cafe,split", "a.jpg,x,train"], 1))
    assert prepare_error(data_config(tmp_path, source)).startswith(f"{source}, line 1, column 10: not UTF-8")


def test_jsonl_not_utf8_is_one_error_naming_the_line(tmp_path, root):
    rows = [json.dumps({"image": "a.jpg", "caption": f"cafe number {n}", "split": "train"}) for n in range(1, 401)]
    source = tmp_path / "t.jsonl"
    source.write_bytes(_with_latin1_byte(rows, 321))
    message = prepare_error(data_config(tmp_path, source))
    assert message.startswith(f"{source}, line 321, column 35: not UTF-8 text (byte 0xe9")
