"""The manifest that stands for a store on S3 in DVC (store/manifest.py, stages/extract/tracked.py), against a real
local S3 server (moto): the same bytes for the same store contents, other bytes when a shard's rows, a shard's
completion or an extra change; a store on S3 without a local .json extract.tracked is refused in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "dsmd-manifest"


S3_BUCKET = BUCKET  # created by the `s3` fixture (tests/conftest.py)


def test_the_manifest_changes_exactly_when_the_store_does(s3, tmp_path):
    from store.extras import put_extra
    from store.manifest import mark_digest, read_manifest, write_manifest
    from store.testing import unit_rows
    from store.writer import FeatureStore

    url = f"s3://{BUCKET}/tracked/features.zarr"
    target = tmp_path / "data" / "features.s3.json"
    rows = unit_rows(24, 4, seed=1)
    with FeatureStore.create_or_open(url, dataset_fingerprint="fp", n_images=24, n_captions=4, rows_per_shard=8,
                                     rows_per_chunk=8, dataset_name="toy") as store:
        store.ensure_array("t", "image", 4, provenance={"checkpoint_sha256": "abc", "dsmd_version": "1.0"})
        marks = [store.write_shard("t", "image", shard, rows[shard * 8:(shard + 1) * 8]) for shard in (0, 1)]

        first = write_manifest(url, target)
        assert read_manifest(target) == first
        assert first["store"] == url and first["dataset_fingerprint"] == "fp" and first["dataset_name"] == "toy"
        array = first["arrays"]["t/image"]
        assert (array["shards"], array["shards_done"], array["dim"], array["dtype"]) == (3, 2, 4, "float16")
        assert array["provenance"] == {"checkpoint_sha256": "abc"}  # the version is volatile: not what is stored
        assert array["marks"] == {"0": mark_digest(marks[0]), "1": mark_digest(marks[1])}
        assert first["extras"] == {}
        text = target.read_text()

        # The same rows written again (a resumed or repeated run): another written_at, the same manifest bytes.
        store.write_shard("t", "image", 1, rows[8:16], overwrite=True)
        assert write_manifest(url, target) == first and target.read_text() == text

        store.write_shard("t", "image", 1, unit_rows(8, 4, seed=2), overwrite=True)  # other rows
        changed = write_manifest(url, target)
        assert changed["arrays"]["t/image"]["marks"]["1"] != array["marks"]["1"]
        assert changed["arrays"]["t/image"]["marks"]["0"] == array["marks"]["0"]

        store.write_shard("t", "image", 2, rows[16:24])  # one more shard finished
        assert write_manifest(url, target)["arrays"]["t/image"]["shards_done"] == 3

    put_extra(url, "map", np.eye(4, dtype=np.float32), provenance={"kind": "test"}, dataset_fingerprint="fp")
    extras = write_manifest(url, target)["extras"]
    assert set(extras) == {"map"} and len(extras["map"]["sha256"]) == 64
    assert extras["map"]["provenance"] == {"kind": "test"}
    assert json.loads(target.read_text())["extras"] == extras
    assert [p.name for p in target.parent.iterdir()] == ["features.s3.json"]  # no partial file left behind


def test_a_store_on_s3_needs_a_local_json_tracked_file(tmp_path):
    from pipeline.config import Config, replace_settings
    from pipeline.errors import DsmdError
    from stages.extract.tracked import check_tracked

    cfg = Config()
    check_tracked(cfg)  # the demo: a local store, tracked as itself
    on_s3 = replace_settings(cfg, extract=dataclasses.replace(cfg.extract, store="s3://team/features.zarr"))
    with pytest.raises(DsmdError) as caught:
        check_tracked(on_s3)
    assert str(caught.value) == (
        "extract.store s3://team/features.zarr is in a bucket, which DVC cannot track, but extract.tracked is "
        "'data/features.zarr': set extract.tracked to a local .json file (e.g. data/features.s3.json) where dsmd "
        "extract records the store for DVC (docs/s3_dvc.md)")
    for wrong in ("s3://team/features.json", "data/features"):
        with pytest.raises(DsmdError, match="set extract.tracked to a local .json file"):
            check_tracked(replace_settings(on_s3, extract=dataclasses.replace(on_s3.extract, tracked=wrong)))
    check_tracked(replace_settings(on_s3, extract=dataclasses.replace(on_s3.extract,
                                                                      tracked=str(tmp_path / "features.s3.json"))))


def test_a_local_store_tracked_under_another_path_is_warned_about():
    from pipeline.config import Config, replace_settings
    from pipeline.console import console
    from stages.extract.tracked import check_tracked

    cfg = Config()
    moved = replace_settings(cfg, extract=dataclasses.replace(cfg.extract, store="data/other.zarr"))
    with console.capture() as captured:
        check_tracked(cfg)
    assert captured.get() == ""
    with console.capture() as captured:
        check_tracked(moved)
    assert "extract.tracked (data/features.zarr) is not extract.store (data/other.zarr)" in captured.get()
