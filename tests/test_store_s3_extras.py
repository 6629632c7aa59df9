"""Store extras (the MCAD alignment maps) of a store on S3, against a real local S3 server (moto, tests/s3_helpers.py):
put / get / has / list as objects under <store>/_extras/, the same bytes a local store keeps in its files; damaged
objects refused; and MCAD end to end with extract.store = s3://... (extract -> extract-pairs -> distill -> evaluate).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from extract_helpers import DSMD, FIXTURE, TEACHER, base_params, build_world

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "dsmd-extras"  # moto keeps one set of buckets per process: not the bucket other test modules use
NAME = "mcad-align--a--b"


S3_BUCKET = BUCKET  # created by the `s3` fixture (tests/conftest.py)


def small_store(url: str, fingerprint: str = "fp") -> str:
    from store.testing import fill, unit_rows
    from store.writer import FeatureStore

    with FeatureStore.create_or_open(url, dataset_fingerprint=fingerprint, n_images=16, n_captions=4,
                                     rows_per_shard=8, rows_per_chunk=8) as store:
        store.ensure_array("t", "image", 4)
        fill(store, "t", "image", unit_rows(16, 4))
    return url


def filesystem():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def test_extras_round_trip_on_s3_as_the_objects_a_local_store_keeps_as_files(s3, tmp_path):
    from store.extras import extras_dir, get_extra, has_extra, list_extras, put_extra
    from store.remote import StoreUrl

    url = small_store(f"s3://{BUCKET}/round/features.zarr")
    value = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert list_extras(url) == [] and not has_extra(url, NAME)

    written = put_extra(url, NAME, value, dataset_fingerprint="fp", provenance={"rows": 3, "r2": 0.5})
    put_extra(url, "other", np.array([1, 2, 3], dtype=np.int64), dataset_fingerprint="fp")

    assert isinstance(written, StoreUrl) and written == f"{url}/_extras/{NAME}.npz"
    assert extras_dir(url) == f"{url}/_extras"
    assert has_extra(url, NAME) and not has_extra(url, "missing")
    assert list_extras(url) == [NAME, "other"]
    extra = get_extra(url, NAME, dataset_fingerprint="fp")
    np.testing.assert_array_equal(extra.value, value)
    assert extra.value.dtype == np.float32 and extra.provenance == {"rows": 3, "r2": 0.5}
    assert extra.record["dataset_fingerprint"] == "fp" and extra.record["shape"] == [3, 4]

    # The object is the file a local zarr store keeps: copied into one, it reads back the same.
    local = small_store(str(tmp_path / "features.zarr"))
    (tmp_path / "features.zarr" / "_extras").mkdir()
    filesystem().get_file(written.key, str(tmp_path / "features.zarr" / "_extras" / f"{NAME}.npz"))
    assert get_extra(local, NAME, dataset_fingerprint="fp").record == extra.record

    put_extra(url, NAME, value * 2, dataset_fingerprint="fp")  # replaced in place
    np.testing.assert_array_equal(get_extra(url, NAME).value, value * 2)
    assert list_extras(url) == [NAME, "other"]


def test_refusals_on_s3_name_the_url(s3):
    from store.errors import StoreError
    from store.extras import get_extra, put_extra

    missing = f"s3://{BUCKET}/nothing/features.zarr"
    with pytest.raises(StoreError, match=rf"^{missing}: no feature store there"):
        put_extra(missing, "x", np.ones(2), dataset_fingerprint="fp")
    url = small_store(f"s3://{BUCKET}/refusals/features.zarr")
    with pytest.raises(StoreError, match="extra name '../escape' is not usable"):
        put_extra(url, "../escape", np.ones(2), dataset_fingerprint="fp")
    with pytest.raises(StoreError, match=rf"^{url}: no extra 'x' in this store \(present: none\)"):
        get_extra(url, "x")
    put_extra(url, "x", np.ones(2), dataset_fingerprint="fp")
    with pytest.raises(StoreError, match=rf"^{url}/_extras/x\.npz was made for the dataset with fingerprint fp, "
                                         "not other"):
        get_extra(url, "x", dataset_fingerprint="other")
    with pytest.raises(StoreError, match=r"bucket 'no-such-bucket' does not exist"):
        get_extra("s3://no-such-bucket/features.zarr", "x")


@pytest.mark.parametrize("damage", ["flipped", "truncated", "foreign"])
def test_a_damaged_extra_object_is_refused(s3, damage):
    from store.errors import StoreCorruptError
    from store.extras import get_extra, has_extra, put_extra

    url = small_store(f"s3://{BUCKET}/damaged-{damage}/features.zarr")
    target = put_extra(url, "x", np.linspace(0, 1, 64), dataset_fingerprint="fp")
    fs = filesystem()
    body = bytearray(fs.cat_file(target.key))
    if damage == "flipped":
        body[-300] ^= 0xFF  # inside the array's bytes (np.savez stores them uncompressed)
    elif damage == "truncated":
        body = body[: len(body) // 2]
    else:
        body = bytearray(b"not an npz file")
    fs.pipe_file(target.key, bytes(body))
    assert has_extra(url, "x")
    with pytest.raises(StoreCorruptError, match=rf"^{url}/_extras/x\.npz: (cannot read|damaged) this store extra|"
                                                rf"^{url}/_extras/x\.npz: damaged store extra") as caught:
        get_extra(url, "x", dataset_fingerprint="fp")
    assert "\n" not in str(caught.value) and "dsmd extract-pairs" in str(caught.value)


def test_deleting_an_s3_store_takes_its_extras_along(s3):
    from store.backends import delete_store, store_exists
    from store.extras import list_extras, put_extra

    url = small_store(f"s3://{BUCKET}/deleted/features.zarr")
    put_extra(url, "x", np.ones(3), dataset_fingerprint="fp")
    delete_store(url)  # _extras is the store's own, not a foreign object
    assert not store_exists(url) and list_extras(url) == []
    assert not filesystem().exists(f"{BUCKET}/deleted/features.zarr")


def test_local_extras_never_load_the_s3_code(tmp_path):
    """Local stores keep today's path: no fsspec, no s3fs, no store/s3_extras.py."""
    local = small_store(str(tmp_path / "features.zarr"))
    code = (
        "import sys, numpy as np\n"
        "from store.extras import get_extra, has_extra, list_extras, put_extra\n"
        f"put_extra({local!r}, 'x', np.ones(3), dataset_fingerprint='fp')\n"
        f"assert has_extra({local!r}, 'x') and list_extras({local!r}) == ['x']\n"
        f"assert get_extra({local!r}, 'x', dataset_fingerprint='fp').value.sum() == 3\n"
        "print(sorted(m for m in ('fsspec', 's3fs', 'store.s3_extras', 'store.remote') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['store.remote']"  # URL parsing only


# ------------------------------------------------------------------------------------------- MCAD end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # Fewer images than the other store tests' world: the pipeline's steps, not the data's size, are the point.
    return build_world(tmp_path_factory.mktemp("s3-extras-world"), n_train=8, n_val=2, n_test=2)


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")
def test_mcad_end_to_end_with_the_store_on_s3(s3, world, tmp_path):
    """`dsmd extract` and `dsmd extract-pairs` (subprocesses, as users run them) into the bucket, then MCAD
    distillation (the fixture teacher is both the fused and the one dual teacher) and evaluation from it."""
    from pipeline.alignment import alignment_name
    from pipeline.config import load_config
    from pipeline.config.stages import stage_config
    from stages.distill.train import Trainer
    from stages.evaluate.run import run_evaluate
    from stages.extract.pairs import extract_pairs
    from store.extras import get_extra, list_extras

    url = f"s3://{BUCKET}/mcad/features.zarr"
    params = base_params(world)
    params["extract"] = {**params["extract"], "store": url, "tracked": str(tmp_path / "features.s3.json"),
                         "cache_dir": str(tmp_path / "reader-cache")}
    params.update(
        student={"vision_model": "test_vit", "img_size": 32, "patch_size": 8, "text_hidden": 32, "text_layers": 1,
                 "text_heads": 2, "max_text_len": 24},
        distill={"method": "mcad", "teacher": TEACHER, "epochs": 1, "batch_size": 20, "loader_workers": 0,
                 "device": "cpu", "precision": "fp32", "checkpoint_every": 0, "lr": 1e-3, "val_batch_size": 64,
                 "out_dir": str(tmp_path / "out"), "losses": {"queue_size": 40},
                 "mcad": {"fused_teacher": TEACHER, "teachers": [TEACHER], "teacher_weights": [1.0]}},
        evaluate={"batch_size": 64, "out_dir": str(tmp_path / "evaluate"), "ablations": "", "examples": 0},
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    for command in ("extract", "extract-pairs"):
        done = subprocess.run([*DSMD, "--params", str(params_file), command], cwd=tmp_path, capture_output=True,
                              text=True)
        assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"

    name = alignment_name(TEACHER, TEACHER)
    assert list_extras(url) == [name]
    assert filesystem().isfile(f"{BUCKET}/mcad/features.zarr/_extras/{name}.npz")
    fit = get_extra(url, name).provenance
    assert fit["kind"] == "mcad-alignment" and fit["rows"] == 24  # 8 train images x 3 captions
    cfg = load_config(params_file)
    again = extract_pairs(cfg)  # every shard and the map are up to date: nothing is written or fitted again
    assert again.shards_written == 0 and again.alignments[TEACHER]["refitted"] is False
    assert get_extra(url, name).provenance == fit

    shutil.rmtree(tmp_path / "reader-cache", ignore_errors=True)
    summary = Trainer(stage_config(cfg, "distill")).train()
    assert summary["steps"] > 0
    # MCAD's readers use extract.cache_dir like DSMD's (they used the default cache before).
    assert [p for p in (tmp_path / "reader-cache").rglob("*") if "-pair-" in p.name and not p.name.startswith(".")]
    assert all(np.isfinite(v) for v in summary.values() if isinstance(v, float))
    metrics = run_evaluate(stage_config(cfg, "evaluate"))
    assert metrics
