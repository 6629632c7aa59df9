"""`dsmd store verify / convert / info`: damage is found and named, conversions are exact."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from store import FeatureStore, StoreError, open_store
from store.convert import convert_store
from store.errors import StoreCorruptError
from store.info import store_info
from store.testing import fill, unit_rows
from store.verify import verify_store

FP = "1" * 64
OTHER_FP = "2" * 64
ARGS = dict(dataset_fingerprint=FP, n_images=200, n_captions=450, rows_per_shard=64, rows_per_chunk=16,
            dataset_name="toy")
PROVENANCE = {"teacher": {"name": "t", "checkpoint_sha256": "9" * 64}, "image_preprocessing": {"size": 64}}
SKIPPED = {10: "truncated JPEG", 150: "missing file"}


def make_store(path, complete=True):
    with FeatureStore.create_or_open(path, **ARGS) as store:
        for kind, seed in (("image", 1), ("text", 2)):
            store.ensure_array("t", kind, 16, provenance=PROVENANCE)
            rows = store.layout.rows(kind)
            fill(store, "t", kind, unit_rows(rows, 16, seed), SKIPPED if kind == "image" else None,
                 shards=None if complete or kind == "image" else [0, 1, 2])


def poke_row(path, row, change):
    """Change one stored image row in place, as disk damage or a buggy tool would."""
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as handle:
            data = handle["t/image"]
            data[row] = change(data[row])
        return
    shard_file = path / "t" / "image" / "c" / str(row // 64) / "0"
    mapped = np.memmap(shard_file, dtype="<f2", mode="r+", shape=(64, 16))
    mapped[row % 64] = change(np.array(mapped[row % 64]))
    mapped.flush()


@pytest.fixture(params=[".zarr", ".h5"])
def store_path(tmp_path, request):
    path = tmp_path / f"features{request.param}"
    make_store(path)
    return path


def problems_of(path, **kwargs) -> str:
    report = verify_store(path, **kwargs)
    assert not report.ok
    return "\n".join(report.problems)


def test_clean_store_verifies(store_path):
    report = verify_store(store_path)
    assert report.ok, report.problems
    assert (report.arrays, report.shards_checked, report.rows_checked) == (2, 4 + 8, 650)


def test_verify_finds_nan_row(store_path):
    poke_row(store_path, 77, lambda r: np.where(np.arange(16) == 3, np.nan, r))
    found = problems_of(store_path)
    assert "t/image shard 1 (rows 64..127): row 77 is not finite" in found
    assert "do not match the checksum" in found


def test_verify_finds_unnormalised_row(store_path):
    poke_row(store_path, 130, lambda r: r * 0.5)
    assert "row 130 has norm 0.5" in problems_of(store_path)


def test_verify_finds_nonzero_skipped_row(store_path):
    poke_row(store_path, 150, lambda r: np.full_like(r, 0.25))
    assert "row 150 is skipped but not a zero vector" in problems_of(store_path)


def test_verify_finds_missing_shard_file_and_missing_mark(tmp_path):
    path = tmp_path / "features.zarr"
    make_store(path)
    (path / "t" / "text" / "c" / "3" / "0").unlink()
    (path / "t" / "image" / "marks" / "shard-000002.json").unlink()
    found = problems_of(path)
    assert "t/text shard 3 (rows 192..255): shard file" in found and "is missing" in found
    assert "t/image shard 2 (rows 128..191): not complete (no completion mark)" in found
    with open_store(path) as reader:
        with pytest.raises(StoreError, match="shard 2 .*not complete"):
            reader.get("t", "image", [130])


def test_verify_finds_missing_shard_in_hdf5(tmp_path):
    path = tmp_path / "features.h5"
    make_store(path, complete=False)
    found = problems_of(path)
    assert "t/text shard 3 (rows 192..255): not complete" in found


def test_verify_checks_dataset_fingerprint(store_path, tmp_path):
    dataset = tmp_path / "canonical"
    dataset.mkdir()
    card = {"schema_version": 1, "name": "other", "fingerprint": OTHER_FP, "counts": {"images": 200, "captions": 9}}
    (dataset / "dataset.json").write_text(json.dumps(card))
    found = problems_of(store_path, dataset_dir=dataset)
    assert f"made for dataset 'toy' (fingerprint {FP})" in found and OTHER_FP in found
    assert "store has 450 captions rows" in found
    card.update(fingerprint=FP, counts={"images": 200, "captions": 450})
    (dataset / "dataset.json").write_text(json.dumps(card))
    assert verify_store(store_path, dataset_dir=dataset).ok


def test_convert_round_trip_is_exact(tmp_path):
    source = tmp_path / "a.zarr"
    make_store(source)
    summary = convert_store(source, tmp_path / "b.h5")
    assert (summary.backend, summary.shards_written, summary.shards_left) == ("hdf5", 12, 0)
    convert_store(tmp_path / "b.h5", tmp_path / "c.zarr")
    for path in (tmp_path / "b.h5", tmp_path / "c.zarr"):
        assert verify_store(path).ok
    with open_store(source) as a, open_store(tmp_path / "b.h5") as b, open_store(tmp_path / "c.zarr") as c:
        assert b.backend == "hdf5" and c.backend == "zarr"
        for kind in ("image", "text"):
            ids = np.arange(a.shape("t", kind)[0])
            bits = [r.get("t", kind, ids, dtype=None).view(np.uint16) for r in (a, b, c)]
            assert np.array_equal(bits[0], bits[1]) and np.array_equal(bits[0], bits[2])
            assert a.provenance("t", kind) == b.provenance("t", kind) == c.provenance("t", kind) == PROVENANCE
            assert a.skipped("t", kind) == b.skipped("t", kind) == c.skipped("t", kind)
            sums = [{s: m.data_sha256 for s, m in r.marks("t", kind).items()} for r in (a, b, c)]
            assert sums[0] == sums[1] == sums[2]
        assert a.root["dataset_fingerprint"] == b.root["dataset_fingerprint"] == c.root["dataset_fingerprint"]
        assert c.dataset_name == "toy"
    # the zarr copy of the HDF5 copy is the original, file for file
    for shard_file in (source / "t").rglob("c/*/0"):
        assert shard_file.read_bytes() == (tmp_path / "c.zarr" / shard_file.relative_to(source)).read_bytes()


def test_convert_copies_finished_shards_and_resumes(tmp_path):
    source = tmp_path / "a.zarr"
    make_store(source, complete=False)
    first = convert_store(source, tmp_path / "b.h5")
    assert (first.shards_written, first.shards_left) == (4 + 3, 5)
    with FeatureStore.create_or_open(source, **ARGS) as store:
        fill(store, "t", "text", unit_rows(450, 16, 2))
    second = convert_store(source, tmp_path / "b.h5")
    assert (second.shards_written, second.shards_left) == (5, 0)
    assert verify_store(tmp_path / "b.h5").ok


def test_info_describes_the_store(tmp_path):
    path = tmp_path / "a.zarr"
    make_store(path, complete=False)
    described = store_info(path)
    assert described["backend"] == "zarr" and described["teachers"] == ["t"]
    image, text = described["arrays"]
    assert image["shape"] == [200, 16] and image["dtype"] == "float16"
    assert (image["shards_complete"], image["shards_total"], image["valid_rows"]) == (4, 4, 198)
    assert image["skipped_reasons"] == {"truncated JPEG": 1, "missing file": 1}
    assert (text["shards_complete"], text["shards_total"]) == (3, 8)
    assert image["provenance"] == PROVENANCE and described["size_bytes"] > 200 * 16 * 2


def test_cli_info_verify_convert(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = tmp_path / "a.zarr"
    make_store(path)
    runner = CliRunner()
    info = runner.invoke(app, ["store", "info", str(path), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["arrays"][0]["teacher"] == "t"
    assert runner.invoke(app, ["store", "info", str(path)]).exit_code == 0
    assert runner.invoke(app, ["store", "verify", str(path)]).exit_code == 0
    converted = runner.invoke(app, ["store", "convert", str(path), str(tmp_path / "b.h5")])
    assert converted.exit_code == 0, converted.output
    poke_row(tmp_path / "b.h5", 5, lambda r: r * 3)
    failed = runner.invoke(app, ["store", "verify", str(tmp_path / "b.h5")])
    assert failed.exit_code == 1 and "row 5 has norm 3" in failed.stderr


def test_cli_error_is_one_line_exit_2(tmp_path):
    code = "from pipeline.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "store", "info", str(tmp_path / "nothing.zarr")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no feature store there" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_verify_lists_a_missing_shard_file_of_a_stitched_store(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    path = tmp_path / "a.zarr"
    with FeatureStore.create_or_open(path, **ARGS) as store:
        store.ensure_array("t", "image", 32, provenance=PROVENANCE)  # 64 rows x 32 x 2 bytes: whole pages
        fill(store, "t", "image", unit_rows(200, 32, 3))
    (path / "t" / "image" / "c" / "1" / "0").unlink()
    runner = CliRunner()
    assert runner.invoke(app, ["store", "info", str(path)]).exit_code == 0
    result = runner.invoke(app, ["store", "verify", str(path)])
    assert result.exit_code == 1 and "t/image shard 1 (rows 64..127): shard file" in result.stderr
    with open_store(path) as reader:
        assert reader.get("t", "image", [0, 199]).shape == (2, 32)
        with pytest.raises(StoreCorruptError, match=r"c/1/0: t/image rows 64..127: shard file is missing.*--repair"):
            reader.get("t", "image", [70])
