"""Damaged stores fail loud and are repaired shard by shard; full disks and busy stores are one clear line.

Damage is made the way it happens: a file cut short, bytes flipped in place, a full disk in the middle of a
write (injected at the file-write layer zarr and the mark writer use), a second writer on the same store.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import store.fsutil
import store.integrity
from store import FeatureStore, open_store
from store.backends import delete_store, writer_lease
from store.convert import convert_store
from store.errors import StoreBusyError, StoreCorruptError, StoreDiskFullError, StoreError
from store.testing import fill, unit_rows
from store.verify import verify_store

FP = "3" * 64
N_IMAGES, ROWS_PER_SHARD, ROWS_PER_CHUNK = 200, 64, 16
ARGS = dict(dataset_fingerprint=FP, n_images=N_IMAGES, n_captions=10, rows_per_shard=ROWS_PER_SHARD,
            rows_per_chunk=ROWS_PER_CHUNK, dataset_name="toy")
FIX = "dsmd extract --repair"


def make_store(path, dim=32):
    """Image rows only, 4 shards (the last one short). dim 32: shards fill whole pages (one stitched map);
    dim 16: one map per shard."""
    with FeatureStore.create_or_open(path, **ARGS) as writer:
        writer.ensure_array("t", "image", dim, provenance={"teacher": "t"})
        fill(writer, "t", "image", unit_rows(N_IMAGES, dim, seed=5), {9: "missing file"})
    return path


def shard_file(path, shard):
    return path / "t" / "image" / "c" / str(shard) / "0"


def row_offset(path, row, dim):
    """Byte offset of a stored row inside its shard file (zarr) or in the HDF5 file."""
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as handle:
            return handle["t/image"].id.get_offset() + row * dim * 2
    return (row % ROWS_PER_SHARD) * dim * 2  # our shards start with their first row


def flip_bit(file, offset):
    """Flip the lowest mantissa bit of one float16: the row stays finite and of unit norm, only changed."""
    with open(file, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))


def one_line_naming(exc: BaseException, *parts: str) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"
    return text


# -- damage is found by every reader --------------------------------------------------------------------
@pytest.mark.parametrize("dim", [32, 16], ids=["stitched", "per-shard-maps"])
def test_truncated_shard_is_one_error_naming_file_rows_and_fix(tmp_path, dim):
    path = make_store(tmp_path / "a.zarr", dim)
    damaged = shard_file(path, 1)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with open_store(path) as reader:
        assert reader.get("t", "image", [0, 199]).shape == (2, dim)  # the other shards still read
        with pytest.raises(StoreCorruptError) as caught:
            reader.get("t", "image", [5, 70])
    one_line_naming(caught.value, str(damaged), "t/image rows 64..127", "truncated", f"dsmd store verify {path}", FIX)
    report = verify_store(path)
    assert [(d.shard, d.file, d.marked) for d in report.damaged] == [(1, damaged, True)]


@pytest.mark.parametrize("suffix,dim", [(".zarr", 32), (".zarr", 16), (".h5", 32)],
                         ids=["zarr-stitched", "zarr-per-shard", "hdf5"])
def test_flipped_bits_in_row_data_are_detected_by_readers_and_verify(tmp_path, suffix, dim):
    path = make_store(tmp_path / f"a{suffix}", dim)
    file = path if suffix == ".h5" else shard_file(path, 1)
    flip_bit(file, row_offset(path, 70, dim) + 4)
    # rows 64..79 hold row 70: the block of rows_per_chunk rows whose crc32c no longer matches
    with open_store(path) as reader:
        assert reader.get("t", "image", [63, 128]).shape == (2, dim)
        with pytest.raises(StoreCorruptError) as caught:
            reader.get("t", "image", [100])  # same shard, another block: the whole shard is checked
    one_line_naming(caught.value, str(file), "t/image rows 64..79", "changed since they were written", FIX)
    with pytest.raises(StoreCorruptError, match="rows 64..79"):
        open_store(path, teacher="t", kinds=("image",), in_memory=True)
    with open_store(path) as reader, pytest.raises(StoreCorruptError, match="rows 64..79"):
        for _ in reader.stream("t", "image", batch_size=32):
            pass
    found = "\n".join(verify_store(path).problems)
    assert "t/image shard 1 (rows 64..127): rows 64..79 do not match the checksum" in found


def test_damaged_shard_index_is_detected(tmp_path):
    path = make_store(tmp_path / "a.zarr", 16)
    file = shard_file(path, 2)
    flip_bit(file, file.stat().st_size - 10)  # inside the index table at the end of the file
    with open_store(path) as reader, pytest.raises(StoreCorruptError) as caught:
        reader.get("t", "image", [130])
    one_line_naming(caught.value, str(file), "t/image rows 128..191", "index", FIX)


def test_marks_without_block_checksums_fall_back_to_the_shard_sha256(tmp_path):
    path = make_store(tmp_path / "a.zarr", 32)
    for mark_file in (path / "t" / "image" / "marks").glob("shard-*.json"):  # as written before block checksums
        body = json.loads(mark_file.read_text())
        del body["block_rows"], body["block_crc32c"]
        mark_file.write_text(json.dumps(body))
    with open_store(path) as reader:
        assert reader.get("t", "image", np.arange(N_IMAGES)).shape == (N_IMAGES, 32)
    flip_bit(shard_file(path, 3), row_offset(path, 195, 32))
    with open_store(path) as reader, pytest.raises(StoreCorruptError, match="rows 192..199"):
        reader.get("t", "image", [195])


def test_each_shard_is_checked_once_not_per_batch(tmp_path, monkeypatch):
    path = make_store(tmp_path / "a.zarr", 32)
    checked = []
    real = store.integrity.damaged_rows
    monkeypatch.setattr("store.reader.damaged_rows", lambda rows, mark: checked.append(mark.shard) or real(rows, mark))
    rng = np.random.default_rng(0)
    with open_store(path) as reader:
        for _ in range(50):
            reader.get("t", "image", rng.integers(0, N_IMAGES, 32))
    assert sorted(checked) == [0, 1, 2, 3]


def test_truncated_hdf5_store_is_one_error_naming_the_file(tmp_path):
    path = make_store(tmp_path / "a.h5")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for read in (lambda: open_store(path).get("t", "image", [150]), lambda: verify_store(path)):
        with pytest.raises(StoreCorruptError) as caught:
            read()
        one_line_naming(caught.value, f"{path}: not a readable HDF5 file", "truncated")


def test_unreadable_mark_is_one_error_and_verify_lists_it_as_damaged(tmp_path):
    path = make_store(tmp_path / "a.zarr")
    mark = path / "t" / "image" / "marks" / "shard-000002.json"
    mark.write_text('{"format": "dsmd-shard-mark", "vers')
    with pytest.raises(StoreCorruptError) as caught:
        open_store(path).get("t", "image", [0])
    one_line_naming(caught.value, f"{mark}: shard completion mark is unreadable", FIX)
    (damage,) = verify_store(path).damaged
    assert (damage.shard, damage.marked, damage.file) == (2, True, shard_file(path, 2))
    with FeatureStore.create_or_open(path, **ARGS) as writer:
        writer.drop_shards("t", "image", [2])
        assert writer.pending_shards("t", "image") == [2]


# -- repair: drop exactly the flagged shards ---------------------------------------------------------------
def test_dropping_flagged_shards_rewrites_only_those(tmp_path):
    path = make_store(tmp_path / "a.zarr", 16)
    files = [p for p in (path / "t" / "image").rglob("*") if p.is_file() and p.name != ".lock"]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    nan_row = np.memmap(shard_file(path, 2), dtype="<f2", mode="r+", shape=(ROWS_PER_SHARD, 16))
    nan_row[5, 3] = np.nan
    nan_row.flush()
    del nan_row
    report = verify_store(path)
    assert [d.shard for d in report.damaged] == [2]
    assert any("row 133 is not finite" in p for p in report.damaged[0].problems)
    with FeatureStore.create_or_open(path, **ARGS) as writer:
        writer.drop_shards("t", "image", [d.shard for d in report.damaged])
        assert writer.pending_shards("t", "image") == [2]
        fill(writer, "t", "image", unit_rows(N_IMAGES, 16, seed=5), {9: "missing file"})
    assert verify_store(path).ok
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    rewritten = sorted(str(p.relative_to(path)) for p in files if before[p] != after[p])
    assert rewritten == ["t/image/c/2/0", "t/image/marks/shard-000002.json"]  # every other file untouched
    assert after[shard_file(path, 2)][0] == before[shard_file(path, 2)][0]  # the same rows as first written


# -- full disk ---------------------------------------------------------------------------------------------
def fill_disk_at(monkeypatch, match: str, *, after_bytes: int = 100):
    """Files whose name contains `match` take `after_bytes` bytes, then the disk is full (ENOSPC)."""
    real_path_open, real_open = pathlib.Path.open, open

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            head = data[:after_bytes] if isinstance(data, str) else bytes(memoryview(data).cast("B"))[:after_bytes]
            self.handle.write(head)
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def wrap(handle, name, mode):
        return FullFile(handle) if match in str(name) and "w" in mode else handle

    monkeypatch.setattr(pathlib.Path, "open",
                        lambda self, mode="r", *a, **k: wrap(real_path_open(self, mode, *a, **k), self, mode))
    monkeypatch.setattr(store.fsutil, "open",
                        lambda file, mode="r", *a, **k: wrap(real_open(file, mode, *a, **k), file, mode),
                        raising=False)


def leftovers(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if ".partial" in p.name or ".tmp-" in p.name)


@pytest.mark.parametrize("full_at", ["shard data", "mark"])
def test_disk_full_is_one_line_leaves_no_partial_files_and_the_rerun_resumes(tmp_path, monkeypatch, full_at):
    path = tmp_path / "a.zarr"
    values = unit_rows(N_IMAGES, 16, seed=5)
    with FeatureStore.create_or_open(path, **ARGS) as writer:
        writer.ensure_array("t", "image", 16)
        fill(writer, "t", "image", values, shards=[0, 1])
        with monkeypatch.context() as patch:
            fill_disk_at(patch, "c/2/0" if full_at == "shard data" else "shard-000002.json")
            with pytest.raises(StoreDiskFullError) as caught:
                fill(writer, "t", "image", values)
        target = shard_file(path, 2) if full_at == "shard data" else path / "t/image/marks/shard-000002.json"
        one_line_naming(caught.value, f"no space left on device writing {target}",
                        "free space and rerun: finished shards are kept")
        assert leftovers(path) == [] and not shard_file(path, 2).exists()
        assert writer.pending_shards("t", "image") == [2, 3]
        assert fill(writer, "t", "image", values) == [2, 3]  # space is back: the same call finishes the work
    assert verify_store(path).ok


def test_convert_into_a_full_disk_then_resumes(tmp_path, monkeypatch):
    source = make_store(tmp_path / "a.zarr", 16)
    with monkeypatch.context() as patch:
        fill_disk_at(patch, "b.zarr/t/image/c/1/0")
        with pytest.raises(StoreDiskFullError, match="no space left on device writing .*b.zarr/t/image/c/1/0"):
            convert_store(source, tmp_path / "b.zarr")
    assert leftovers(tmp_path / "b.zarr") == []
    assert convert_store(source, tmp_path / "b.zarr").shards_written == 3
    assert verify_store(tmp_path / "b.zarr").ok


def test_convert_of_a_damaged_source_is_one_line_exit_2(tmp_path):
    source = make_store(tmp_path / "a.zarr", 16)
    damaged = shard_file(source, 1)
    damaged.write_bytes(damaged.read_bytes()[:-100])
    code = "from pipeline.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "store", "convert", str(source), str(tmp_path / "b.h5")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert str(damaged) in done.stderr and "t/image rows 64..127" in done.stderr and FIX in done.stderr


# -- one writer at a time; other people's folders are not ours -----------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from store.backends import writer_lease
with writer_lease(Path(sys.argv[1]), "dsmd extract"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_told_who_holds_the_store(tmp_path):
    path = make_store(tmp_path / "a.zarr")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusyError) as caught:
            convert_store(make_store(tmp_path / "b.zarr"), path)
        one_line_naming(caught.value, f"another `dsmd extract` is running on {path} (pid {holder.pid} on host",
                        "wait for it to finish", "run `dsmd store convert` again")
    finally:
        holder.kill()
        holder.wait()
    with writer_lease(path, "dsmd store convert"):  # the kernel dropped the dead holder's lock
        pass


def test_a_folder_that_is_not_a_store_is_refused_and_left_as_it_was(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for attempt in (lambda: FeatureStore.create_or_open(folder, **ARGS),
                    lambda: writer_lease(folder, "dsmd extract").__enter__(),
                    lambda: delete_store(folder)):
        with pytest.raises(StoreError, match=f"{folder} holds notes.txt but is not a dsmd feature store"):
            attempt()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # no lock file left in it


def test_deleting_a_store_refuses_foreign_files_and_keeps_a_held_lease(tmp_path):
    path = make_store(tmp_path / "a.zarr")
    (path / "results.csv").write_text("mine")
    with pytest.raises(StoreError, match="also holds results.csv"):
        delete_store(path)
    assert (path / "t").is_dir()
    (path / "results.csv").unlink()
    with writer_lease(path, "dsmd extract"):
        delete_store(path)
        assert sorted(p.name for p in path.iterdir()) == [".dsmd-writer.lock"]
    h5 = tmp_path / "b.h5"
    convert_store(make_store(tmp_path / "c.zarr"), h5)
    delete_store(h5)
    assert not h5.exists()
