"""The feature store on S3-compatible object storage, against a real local S3 server (moto, tests/s3_helpers.py):
extract -> store info/verify -> distill -> evaluate with extract.store = s3://..., a SIGKILLed extraction
resumed to the same arrays as an uninterrupted one, a bounded reader cache, and one-line storage errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from extract_helpers import DSMD, FIXTURE, TEACHER, assert_same_contents, base_params, build_world, read_store

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="beit3-tiny fixture not found")

SHARDS = 5 + 14  # 36 images and 108 captions in shards of 8 rows


S3_BUCKET = "dsmd"  # created by the `s3` fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("s3-world"))


def params_for(world, run_dir: Path, store: str, **sections) -> Path:
    params = base_params(world)
    params["extract"] = {**params["extract"], "store": store}
    if store.startswith("s3://"):  # where extract records the store for DVC (stages/extract/tracked.py)
        params["extract"]["tracked"] = str(run_dir / "features.s3.json")
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def load(params: Path):
    from pipeline.config import load_config

    return load_config(params)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted extraction into a local store."""
    from stages.extract.run import run_extract

    run_dir = tmp_path_factory.mktemp("local")
    run_extract(load(params_for(world, run_dir, str(run_dir / "features.zarr"))))
    return read_store(run_dir / "features.zarr", world.canonical)


def s3_marks(url: str) -> set[tuple[str, int]]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    key = url.removeprefix("s3://")
    return {(p.split("/")[-3], int(p.rsplit("-", 1)[1].split(".")[0]))
            for p in fs.glob(f"{key}/{TEACHER}/*/marks/shard-*.json")}


def test_killed_extraction_to_s3_resumes_to_the_arrays_of_an_uninterrupted_run(s3, world, reference, tmp_path):
    from stages.extract.run import run_extract

    url = "s3://dsmd/killed/features.zarr"
    params = params_for(world, tmp_path, url)
    log = (tmp_path / "out.log").open("wb")
    process = subprocess.Popen([*DSMD, "--params", str(params), "extract"], cwd=tmp_path, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and not s3_marks(url):
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "out.log").read_text()
    before = s3_marks(url)
    assert 1 <= len(before) < SHARDS

    summary = run_extract(load(params))

    assert summary.shards_already_done == len(before)
    assert summary.shards_written == SHARDS - len(before)
    assert len(s3_marks(url)) == SHARDS
    assert_same_contents(read_store(url, world.canonical), reference)


@pytest.fixture(scope="module")
def s3_store(s3, world, tmp_path_factory) -> tuple[str, Path]:
    """`dsmd extract` (a subprocess, as users run it) into s3://dsmd/e2e/features.zarr."""
    url = "s3://dsmd/e2e/features.zarr"
    run_dir = tmp_path_factory.mktemp("e2e")
    params = params_for(
        world, run_dir, url,
        student={"vision_model": "test_vit", "img_size": 32, "patch_size": 8, "text_hidden": 32, "text_layers": 1,
                 "text_heads": 2, "max_text_len": 24},
        distill={"teacher": TEACHER, "epochs": 1, "batch_size": 20, "loader_workers": 0, "device": "cpu",
                 "precision": "fp32", "checkpoint_every": 0, "lr": 1e-3, "val_batch_size": 64,
                 "out_dir": str(run_dir / "out"), "losses": {"queue_size": 40}},
        evaluate={"batch_size": 64, "out_dir": str(run_dir / "evaluate"), "ablations": "", "examples": 0},
    )
    done = subprocess.run([*DSMD, "--params", str(params), "extract"], cwd=run_dir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads((run_dir / "features.s3.json").read_text())  # extract.tracked, for DVC
    assert recorded["store"] == url and recorded["arrays"][f"{TEACHER}/image"]["shards_done"] == 5
    return url, params


def test_store_info_and_verify_work_on_s3(s3_store, world, reference):
    url, params = s3_store
    info = subprocess.run([*DSMD, "store", "info", url, "--json"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr[-2000:]
    described = json.loads(info.stdout)
    assert described["path"] == url and described["size_bytes"] > 0
    assert {(a["kind"], a["shards_complete"], a["shards_total"]) for a in described["arrays"]} == {
        ("image", 5, 5), ("text", 14, 14)}
    verify = subprocess.run([*DSMD, "store", "verify", url, "--dataset", str(world.canonical)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    assert_same_contents(read_store(url, world.canonical), reference)


def test_verify_on_s3_finds_a_damaged_shard_object(s3, world, tmp_path):
    import s3fs

    from store.testing import fill, unit_rows
    from store.verify import verify_store
    from store.writer import FeatureStore

    url = "s3://dsmd/damaged/features.zarr"
    with FeatureStore.create_or_open(url, dataset_fingerprint="fp", n_images=40, n_captions=8, rows_per_shard=16,
                                     rows_per_chunk=8) as store:
        store.ensure_array("t", "image", 8)
        fill(store, "t", "image", unit_rows(40, 8))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    key = "dsmd/damaged/features.zarr/t/image/c/1/0"
    body = bytearray(fs.cat_file(key))
    body[3] ^= 0xFF
    fs.pipe_file(key, bytes(body))
    report = verify_store(url)
    assert [(d.kind, d.shard) for d in report.damaged] == [("image", 1)]
    assert "sha256" in report.problems[0]


def test_distill_and_evaluate_read_the_store_on_s3(s3_store, world):
    from pipeline.config.stages import stage_config
    from stages.distill.train import Trainer
    from stages.evaluate.run import run_evaluate

    url, params = s3_store
    cfg = load(params)
    summary = Trainer(stage_config(cfg, "distill")).train()
    assert summary["steps"] > 0
    assert all(np.isfinite(v) for v in summary.values() if isinstance(v, float))
    metrics = run_evaluate(stage_config(cfg, "evaluate"))
    assert metrics  # recall figures came back from the student against the S3 teacher features


@pytest.mark.parametrize("workers", [0, 2])
def test_distill_blocks_order_on_s3_prefetches_and_trains_exactly_as_without(s3_store, world, tmp_path, monkeypatch,
                                                                             workers):
    """distill.order blocks with the store on S3 downloads each window's shards ahead (WindowPrefetch, in the
    main process; with loader workers their readers find the files in the shared cache); the batches, and so
    every logged loss and the validation figures, are those of the same run without it."""
    import csv

    from pipeline.config.stages import stage_config
    from stages.distill.train import Trainer
    from store import open_store
    from store.reader import StoreReader

    url, params = s3_store
    with open_store(url, cache_dir=tmp_path / "probe") as reader:
        shard_bytes = reader.marks(TEACHER, "text")[0].file_size
    real, started = StoreReader.prefetch, []

    def counted(self, wanted, held=()):
        counts = real(self, wanted, held)
        started.append(counts["started"])
        return counts

    logs = {}
    for name, prefetch in (("with", counted), ("without", lambda self, wanted, held=(): {})):
        monkeypatch.setattr(StoreReader, "prefetch", prefetch)
        settings = yaml.safe_load(params.read_text())
        # Each run starts with an empty cache, which holds 12 of the 19 shards: the integrity check at the start
        # reads every shard, and windows after the first find theirs evicted.
        settings["extract"].update(cache_dir=str(tmp_path / name / "cache"), cache_gb=12 * shard_bytes / 2**30)
        settings["distill"].update(order="blocks", order_block_rows=8, order_window=2, epochs=2,
                                   loader_workers=workers,
                                   out_dir=str(tmp_path / name / "out"))
        (tmp_path / name).mkdir()
        changed = tmp_path / name / "params.yaml"
        changed.write_text(yaml.safe_dump(settings, sort_keys=False))
        summary = Trainer(stage_config(load(changed), "distill")).train()
        with open(tmp_path / name / "out" / "train_log.csv") as handle:
            rows = [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(handle)]
        logs[name] = (rows, (tmp_path / name / "out" / "val_log.csv").read_text(), summary["best_val_rsum"])
    assert sum(started) > 0  # the windows' shards were downloaded ahead
    assert logs["with"][0] and logs["with"] == logs["without"]


def test_reader_cache_stays_within_its_size_limit(s3_store, world, reference, tmp_path):
    from store import open_store

    url, _ = s3_store
    shard_bytes = 8 * reference.rows["text"].shape[1] * 2  # rows_per_shard x dim x float16
    limit = 3 * shard_bytes + 3 * 64  # three shard files (rows and index) at most, of the 14 read
    with open_store(url, cache_dir=tmp_path / "cache", cache_bytes=limit) as reader:
        rows = reader.get(TEACHER, "text", np.arange(108), dtype=None)
        cached = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    np.testing.assert_array_equal(rows, reference.rows["text"])
    assert 0 < cached <= limit


def test_valid_rows_of_an_s3_store_download_no_shard(s3_store, world, reference, tmp_path):
    """What distill asks before its first step (which rows hold features) comes from the marks: a store too
    large for any cache must not be downloaded whole first. The shard a read then touches is checked then."""
    from store import open_store

    url, _ = s3_store
    with open_store(url, cache_dir=tmp_path / "cache") as reader:
        valid = reader.valid(TEACHER, "text")
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        rows = reader.get(TEACHER, "text", np.arange(8), dtype=None)
        assert len([p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.startswith(".")]) == 1
    np.testing.assert_array_equal(valid, reference.valid["text"])
    np.testing.assert_array_equal(rows, reference.rows["text"][:8])


def test_hdf5_on_s3_is_refused_in_one_line(s3):
    from store.errors import StoreError
    from store.writer import FeatureStore

    with pytest.raises(StoreError, match=r"s3://dsmd/x\.h5: HDF5 stores cannot live on object storage; use the zarr"):
        FeatureStore.create_or_open("s3://dsmd/x.h5", dataset_fingerprint="fp", n_images=4, n_captions=4)


def test_missing_bucket_and_unreachable_endpoint_are_one_line_errors(s3, tmp_path):
    from s3_helpers import free_port

    missing = subprocess.run([*DSMD, "store", "info", "s3://no-such-bucket/features.zarr"],
                             capture_output=True, text=True)
    assert missing.returncode != 0
    assert "bucket 'no-such-bucket' does not exist" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr

    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    started = time.monotonic()
    down = subprocess.run([*DSMD, "store", "info", "s3://dsmd/features.zarr"], capture_output=True, text=True,
                          env=env)
    output = (down.stdout + down.stderr).strip()
    assert down.returncode != 0 and "Traceback" not in output
    line = [text for text in output.splitlines() if "s3://dsmd/features.zarr" in text]
    assert line and "cannot reach the object store at http://127.0.0.1:" in line[0]
    assert "AWS_ENDPOINT_URL" in line[0]
    assert time.monotonic() - started < 60


def test_wrong_credentials_are_one_line_errors(s3, s3_store):
    """The server checks signatures here (s3_helpers.credentials_enforced): the right key reads the store, a wrong
    secret or an unknown key stops `dsmd store info` and `dsmd extract` with the refused-credentials line."""
    from s3_helpers import credentials_enforced

    url, params = s3_store
    with credentials_enforced(s3) as (key_id, secret):
        def run(key: str, secret: str, *args: str) -> subprocess.CompletedProcess:
            env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
            return subprocess.run([*DSMD, *args], capture_output=True, text=True, env=env, cwd=params.parent)

        allowed = run(key_id, secret, "store", "info", url, "--json")
        assert allowed.returncode == 0, allowed.stderr[-2000:]
        assert json.loads(allowed.stdout)["path"] == url
        for key, wrong, answer in ((key_id, secret[::-1], "signature we calculated does not match"),
                                   ("AKIADSMDNOSUCHKEY000", secret, "Access Key Id you provided does not exist")):
            for args in (("store", "info", url), ("--params", str(params), "extract")):
                done = run(key, wrong, *args)
                output = (done.stdout + done.stderr).strip()
                assert done.returncode != 0 and "Traceback" not in output, output[-2000:]
                line = [text for text in output.splitlines() if text.startswith(f"error: {url}: ")]
                assert len(line) == 1, output[-2000:]
                assert "refused the credentials" in line[0] and answer in line[0]
                assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in line[0]


def test_two_dask_workers_fill_one_s3_store(s3, world, reference, tmp_path):
    """Each worker process writes its own whole shards into the bucket; the result is the in-process one."""
    from stages.extract.run import run_extract

    url = "s3://dsmd/dask/features.zarr"
    summary = run_extract(load(params_for(world, tmp_path, url, extract={
        **base_params(world)["extract"], "store": url, "dask_workers": 2})))
    assert summary.workers == 2 and summary.shards_written == SHARDS
    assert len(s3_marks(url)) == SHARDS
    assert_same_contents(read_store(url, world.canonical), reference)


def test_convert_copies_an_s3_store_to_a_local_hdf5_file_exactly(s3_store, world, reference, tmp_path):
    from store.convert import convert_store

    url, _ = s3_store
    summary = convert_store(url, tmp_path / "features.h5")
    assert summary.backend == "hdf5" and summary.shards_written == SHARDS
    assert_same_contents(read_store(tmp_path / "features.h5", world.canonical), reference)


def test_deleting_an_s3_store_refuses_foreign_objects_then_removes_only_the_store(s3):
    import s3fs

    from store.backends import delete_store, store_exists
    from store.errors import StoreError
    from store.testing import fill, unit_rows
    from store.writer import FeatureStore

    url = "s3://dsmd/deleted/features.zarr"
    with FeatureStore.create_or_open(url, dataset_fingerprint="fp", n_images=20, n_captions=4, rows_per_shard=8,
                                     rows_per_chunk=8) as store:
        store.ensure_array("t", "image", 8)
        fill(store, "t", "image", unit_rows(20, 8))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.pipe_file("dsmd/deleted/features.zarr/notes.txt", b"mine")
    fs.pipe_file("dsmd/deleted/neighbour.txt", b"not the store's")
    with pytest.raises(StoreError, match="also holds notes.txt, which no store holds: not deleting it"):
        delete_store(url)
    assert store_exists(url)
    fs.rm_file("dsmd/deleted/features.zarr/notes.txt")
    delete_store(url)
    assert not store_exists(url)
    assert fs.cat_file("dsmd/deleted/neighbour.txt") == b"not the store's"


def test_the_s3_writer_lease_admits_one_writer_and_outlives_no_dead_one(s3):
    """The lease object: a second writer is refused by name while the first holds it; it goes when the holder
    ends; a lease not renewed in time, or held by a pid gone from this host, is taken over; the holder renews."""
    import time

    import s3fs

    from store.errors import StoreBusyError
    from store.remote import StoreUrl
    from store.s3_lease import LEASE_KEY, s3_writer_lease

    url = StoreUrl("s3://dsmd/leased/features.zarr")
    key = f"dsmd/leased/features.zarr/{LEASE_KEY}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    with s3_writer_lease(url, "dsmd extract", renew=0.2):
        held = json.loads(fs.cat_file(key))
        with pytest.raises(StoreBusyError, match=r"another `dsmd extract` is writing s3://dsmd/leased/features.zarr "
                                                 rf"\(pid {os.getpid()} on host "):
            with s3_writer_lease(url, "dsmd store convert"):
                pass
        time.sleep(0.7)
        assert json.loads(fs.cat_file(key))["renewed"] > held["renewed"]  # the holder keeps it fresh
    assert not fs.exists(key)

    def planted(**holder):
        fs.pipe_file(key, json.dumps({"command": "dsmd extract", "since": "then", **holder}).encode())

    planted(host="elsewhere", pid=1, renewed=time.time())  # a live writer on another machine
    with pytest.raises(StoreBusyError, match="pid 1 on host elsewhere"):
        with s3_writer_lease(url, "dsmd extract"):
            pass
    planted(host="elsewhere", pid=1, renewed=time.time() - 600)  # killed there ten minutes ago
    with s3_writer_lease(url, "dsmd extract"):
        assert json.loads(fs.cat_file(key))["pid"] == os.getpid()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    planted(host=socket.gethostname(), pid=dead.pid, renewed=time.time())  # killed here a moment ago
    with s3_writer_lease(url, "dsmd extract"):
        assert json.loads(fs.cat_file(key))["pid"] == os.getpid()
