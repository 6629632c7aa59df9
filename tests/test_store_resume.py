"""Feature store under real crashes and real concurrency: SIGKILLed writers, two writer processes at once."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from store import FeatureStore, StoreError, open_store
from store.testing import fill, unit_rows
from store.verify import verify_store

FP = "f" * 64
N_IMAGES, N_CAPTIONS, DIM, ROWS_PER_SHARD = 700, 1500, 32, 128
ARGS = dict(dataset_fingerprint=FP, n_images=N_IMAGES, n_captions=N_CAPTIONS, rows_per_shard=ROWS_PER_SHARD,
            rows_per_chunk=32)
PROVENANCE = {"teacher": {"name": "t", "checkpoint_sha256": "0" * 64}}
SKIPPED = {3: "truncated JPEG", 600: "missing file"}

# The writer a test kills. Modes: "plain" writes every pending shard, printing each shard number when done;
# "hang-before-mark" stops after shard K's data is durable, before its mark; "torn" leaves shard K's file half
# written. Both signal readiness with a file, then sleep until killed.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from store import FeatureStore
    from store.testing import unit_rows

    path, mode, hang_shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = dict(dataset_fingerprint="f" * 64, n_images=700, n_captions=1500, rows_per_shard=128, rows_per_chunk=32)
    store = FeatureStore.create_or_open(path, **args)
    store.ensure_array("t", "image", 32, provenance={"teacher": {"name": "t", "checkpoint_sha256": "0" * 64}})
    values = unit_rows(700, 32, seed=7)
    skipped = {3: "truncated JPEG", 600: "missing file"}
    backend = store._backend
    write_mark, write_rows = backend.write_mark, backend.write_rows

    def hang():
        Path(path + ".ready").write_text("ready")
        time.sleep(300)

    def mark_then_maybe_hang(mark):
        if mode == "hang-before-mark" and mark.shard == hang_shard:
            hang()
        write_mark(mark)

    def rows_or_torn(teacher, kind, shard, start, stop, data):
        if mode == "torn" and shard == hang_shard:
            extra = write_rows(teacher, kind, shard, start, stop, data)
            file = backend.shard_file(teacher, kind, shard)
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
            hang()
        return write_rows(teacher, kind, shard, start, stop, data)

    backend.write_mark, backend.write_rows = mark_then_maybe_hang, rows_or_torn
    for shard in store.pending_shards("t", "image"):
        start, stop = store.shard_rows("t", "image", shard)
        mine = {r: why for r, why in skipped.items() if start <= r < stop}
        store.write_shard("t", "image", shard, values[start:stop], skipped=mine)
        print(shard, flush=True)
    """
)


def start_writer(tmp_path: Path, store_path: Path, mode: str, hang_shard: int = -1) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen(
        [sys.executable, str(script), str(store_path), mode, str(hang_shard)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("writer never got ready")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def resume(store_path: Path) -> list[int]:
    with FeatureStore.create_or_open(store_path, **ARGS) as store:
        store.ensure_array("t", "image", DIM, provenance=PROVENANCE)
        redone = fill(store, "t", "image", unit_rows(N_IMAGES, DIM, seed=7), SKIPPED)
        assert store.complete("t", "image")
    return redone


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same store written without interruption."""
    path = tmp_path_factory.mktemp("reference") / "features.zarr"
    resume(path)
    return path


def shard_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted((path / "t" / "image" / "c").rglob("*"))
            if p.is_file()}


def assert_identical(path: Path, reference: Path) -> None:
    assert shard_files(path) == shard_files(reference)  # byte-equal shard files
    with open_store(path) as got, open_store(reference) as want:
        ids = np.arange(N_IMAGES)
        assert np.array_equal(got.get("t", "image", ids, dtype=None).view(np.uint16),
                              want.get("t", "image", ids, dtype=None).view(np.uint16))
        assert got.skipped("t", "image") == want.skipped("t", "image") == SKIPPED
        for shard, mark in got.marks("t", "image").items():
            other = want.marks("t", "image")[shard]
            assert (mark.data_sha256, mark.file_sha256, mark.valid_count) == (
                other.data_sha256, other.file_sha256, other.valid_count)
    assert verify_store(path).ok


@pytest.mark.parametrize("mode", ["hang-before-mark", "torn"])
def test_writer_killed_mid_shard_resumes_to_identical_store(tmp_path, reference, mode):
    path = tmp_path / "features.zarr"
    proc = start_writer(tmp_path, path, mode, hang_shard=2)
    wait_for(Path(str(path) + ".ready"), proc)
    # While the writer holds shard 2, nobody else may write it.
    with FeatureStore.create_or_open(path, **ARGS) as other:
        with pytest.raises(StoreError, match="being written by another process"):
            other.write_shard("t", "image", 2, unit_rows(128, DIM, seed=7))
    kill(proc)
    assert (path / "t" / "image" / "c" / "2" / "0").exists()  # data on disk, but no mark
    with open_store(path) as reader:
        assert reader.pending_shards("t", "image") == [2, 3, 4, 5]
        reader.get("t", "image", [0, 255])
        with pytest.raises(StoreError, match="shard 2 .* rerun dsmd extract to finish it"):
            reader.get("t", "image", [256])
    assert not verify_store(path).ok
    assert resume(path) == [2, 3, 4, 5]  # only unfinished shards are redone
    assert_identical(path, reference)


def test_writer_killed_after_some_shards_resumes(tmp_path, reference):
    path = tmp_path / "features.zarr"
    proc = start_writer(tmp_path, path, "plain")
    # Kill right after the second shard reports done: the third is somewhere in flight.
    for _ in range(2):
        assert proc.stdout.readline().strip() != ""
    kill(proc)
    with FeatureStore.create_or_open(path, **ARGS) as store:
        pending = store.pending_shards("t", "image")
    assert pending[0] >= 2 and pending == list(range(pending[0], 6))
    assert resume(path) == pending
    assert_identical(path, reference)


def _concurrent_writer(path: str, rank: int, barrier) -> None:
    barrier.wait()  # both processes create-or-open at the same moment
    with FeatureStore.create_or_open(path, **ARGS) as store:
        for kind, rows in (("image", N_IMAGES), ("text", N_CAPTIONS)):
            store.ensure_array("t", kind, DIM, provenance=PROVENANCE)
            values = unit_rows(rows, DIM, seed=11 if kind == "image" else 12)
            mine = [s for s in range(store.num_shards(kind)) if s % 2 == rank]
            fill(store, "t", kind, values, SKIPPED if kind == "image" else None, shards=mine)


def test_two_writer_processes_fill_one_store(tmp_path):
    path = tmp_path / "features.zarr"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    procs = [context.Process(target=_concurrent_writer, args=(str(path), rank, barrier)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    report = verify_store(path)
    assert report.ok, report.problems
    with open_store(path, dataset_fingerprint=FP, teacher="t", dim=DIM) as reader:
        for kind, rows, seed in (("image", N_IMAGES, 11), ("text", N_CAPTIONS, 12)):
            assert reader.complete("t", kind)
            want = unit_rows(rows, DIM, seed=seed).astype(np.float16).astype(np.float32)
            if kind == "image":
                want[list(SKIPPED)] = 0
            assert np.array_equal(reader.get("t", kind, np.arange(rows)), want)
        assert reader.skipped("t", "image") == SKIPPED


def test_hdf5_allows_one_writer(tmp_path):
    path = tmp_path / "features.h5"
    FeatureStore.create_or_open(path, **ARGS).close()
    code = (
        "import sys, time; from store import FeatureStore; "
        f"s = FeatureStore.create_or_open(sys.argv[1], **{ARGS!r}); print('open', flush=True); time.sleep(300)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match="HDF5 allows one writer"):
            FeatureStore.create_or_open(path, **ARGS)
    finally:
        kill(proc)


def _read_in_child(reader, ids, queue) -> None:
    queue.put(reader.get("t", "image", ids))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_reader_works_in_data_loader_style_workers(tmp_path, reference, method):
    """A reader opened in the parent serves forked children (inherited maps) and spawned ones (reopened)."""
    context = multiprocessing.get_context(method)
    ids = np.array([699, 0, 3, 256, 256, 130])
    with open_store(reference) as reader:
        want = reader.get("t", "image", ids)
        queue = context.Queue()
        proc = context.Process(target=_read_in_child, args=(reader, ids, queue))
        proc.start()
        got = queue.get(timeout=120)
        proc.join(timeout=60)
        assert proc.exitcode == 0 and np.array_equal(got, want)
    with open_store(reference, in_memory=True) as reader:
        copy = pickle.loads(pickle.dumps(reader))
        assert copy._in_ram == {("t", "image")} and np.array_equal(copy.get("t", "image", ids), want)
