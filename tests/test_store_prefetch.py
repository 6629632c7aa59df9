"""Background prefetch of an s3:// store's shards (StoreReader.prefetch) against a real local S3 server (moto):
each shard downloads once, a read waits for a download on its way, a failed download is the read's one-line
error, the shard cache's bound holds, and a local store has nothing to fetch.

Downloads are counted by wrapping the backend's s3fs get_file, which still talks to the server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from store import open_store  # noqa: E402
from store.errors import StoreError  # noqa: E402
from store.testing import fill, unit_rows  # noqa: E402
from store.writer import FeatureStore  # noqa: E402

ROWS, DIM, PER_SHARD = 40, 8, 8  # five shards of image rows
SHARD_BYTES = PER_SHARD * DIM * 2  # float16 rows; a shard file adds its small index to this


S3_BUCKET = "pre"  # created by the `s3` fixture (tests/conftest.py)


def make_store(url: str) -> np.ndarray:
    values = unit_rows(ROWS, DIM, seed=3)
    with FeatureStore.create_or_open(url, dataset_fingerprint="fp", n_images=ROWS, n_captions=ROWS,
                                     rows_per_shard=PER_SHARD, rows_per_chunk=PER_SHARD) as store:
        store.ensure_array("t", "image", DIM)
        fill(store, "t", "image", values)
    return values.astype(np.float16)


@pytest.fixture(scope="module")
def store_url(s3):
    url = "s3://pre/a/features.zarr"
    return url, make_store(url)


class Downloads:
    """Counts (and can hold back) the shard downloads of one reader."""

    def __init__(self, reader, hold: bool = False):
        self.backend = reader._backend
        self.real = self.backend.fs.get_file
        self.keys: list[str] = []
        self.began = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.backend.fs.get_file = self

    def __call__(self, key, local, **kw):
        self.keys.append(key.rsplit("/", 4)[-4:][2])  # the shard number of .../image/c/<shard>/0
        self.began.set()
        assert self.release.wait(30)
        return self.real(key, local, **kw)

    def shards(self) -> list[int]:
        return sorted(int(k) for k in self.keys)


def wait_idle(reader, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while reader._backend._prefetcher.pending() and time.monotonic() < end:
        time.sleep(0.01)


def test_prefetch_downloads_the_shards_of_the_rows_once(store_url, tmp_path):
    url, values = store_url
    with open_store(url, cache_dir=tmp_path / "cache") as reader:
        counted = Downloads(reader)
        ids = np.array([9, 23, 17, 10])  # shards 1 and 2
        assert reader.prefetch([("t", "image", ids)]) == {"cached": 0, "started": 2, "skipped": 0, "over": 0}
        wait_idle(reader)
        assert counted.shards() == [1, 2]
        again = reader.prefetch([("t", "image", ids)])
        assert again["cached"] == 2 and again["started"] == 0
        np.testing.assert_array_equal(reader.get("t", "image", ids, dtype=None), values[ids])
        assert counted.shards() == [1, 2]  # the reads found both in the cache
        reader.get("t", "image", np.array([0]))
        assert counted.shards() == [0, 1, 2]


def test_a_read_waits_for_the_download_on_its_way_instead_of_starting_another(store_url, tmp_path):
    url, values = store_url
    with open_store(url, cache_dir=tmp_path / "cache") as reader, \
            open_store(url, cache_dir=tmp_path / "cache") as other:
        counted, counted_other = Downloads(reader, hold=True), Downloads(other)
        assert reader.prefetch([("t", "image", np.array([33]))])["started"] == 1
        assert counted.began.wait(30)  # shard 4 is downloading, held back
        got: dict = {}
        readers = [threading.Thread(target=lambda r=r, name=name: got.__setitem__(name, r.get("t", "image", [33, 39])))
                   for r, name in ((reader, "same"), (other, "other"))]  # this reader, and another sharing its cache
        for thread in readers:
            thread.start()
        time.sleep(0.3)
        assert all(thread.is_alive() for thread in readers)  # both wait for the download
        counted.release.set()
        for thread in readers:
            thread.join(30)
        assert counted.shards() == [4] and counted_other.shards() == []
        for rows in got.values():
            np.testing.assert_array_equal(rows, values[[33, 39]].astype(np.float32))


def test_a_failed_background_download_is_the_reads_one_line_error(store_url, tmp_path, capfd):
    import s3fs

    url = "s3://pre/gone/features.zarr"
    make_store(url)
    s3fs.S3FileSystem(skip_instance_cache=True).rm_file("pre/gone/features.zarr/t/image/c/2/0")
    with open_store(url, cache_dir=tmp_path / "cache") as reader:
        assert reader.prefetch([("t", "image", np.array([16]))])["started"] == 1
        wait_idle(reader, 2)  # a failed download stays for its reader
        counted = Downloads(reader)
        with pytest.raises(StoreError) as failed:
            reader.get("t", "image", [17])
        message = str(failed.value)
        assert "\n" not in message and "c/2/0" in message and "shard object is missing" in message
        assert counted.keys == []  # raised from the background download, not by trying again
    assert "Traceback" not in capfd.readouterr().err


def test_prefetch_takes_no_more_than_the_cache_holds_next_to_the_rows_still_read(store_url, tmp_path):
    url, values = store_url
    limit = 3 * SHARD_BYTES + 3 * 64  # three shard files (rows and index), of the five
    with open_store(url, cache_dir=tmp_path / "cache", cache_bytes=limit) as reader:
        counted = Downloads(reader)
        reader.get("t", "image", [0])  # shard 0 is being read
        held = [("t", "image", np.arange(8))]
        wanted = [("t", "image", np.array([39])), ("t", "image", np.array([20, 8, 30]))]  # shard 4, then 1, 2, 3
        counts = reader.prefetch(wanted, held=held)
        assert counts == {"cached": 0, "started": 2, "skipped": 0, "over": 2}
        wait_idle(reader)
        assert counted.shards() == [0, 1, 4]
        cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size]
        assert len(cached) == 3 and sum(p.stat().st_size for p in cached) <= limit
        assert any("image-000000" in p.name for p in cached)  # the shard still read was kept
        np.testing.assert_array_equal(reader.get("t", "image", np.arange(ROWS), dtype=None), values)


def test_a_local_store_has_nothing_to_prefetch(tmp_path):
    path = tmp_path / "features.zarr"
    make_store(str(path))
    with open_store(path) as reader:
        assert not reader.remote
        assert reader.prefetch([("t", "image", np.arange(ROWS))]) == {"cached": 0, "started": 0, "skipped": 0,
                                                                      "over": 0}


def test_a_process_forked_during_a_download_does_not_keep_its_lock(store_url, tmp_path):
    """Loader workers are forked while prefetch threads download: they must not inherit the download's lock."""
    import fcntl
    import multiprocessing

    url, _ = store_url
    with open_store(url, cache_dir=tmp_path / "cache") as reader:
        counted = Downloads(reader, hold=True)
        reader.prefetch([("t", "image", np.array([0]))])
        assert counted.began.wait(30)  # the download holds its lock now
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(20,))
        child.start()
        try:
            counted.release.set()
            wait_idle(reader)
            (lock,) = (tmp_path / "cache").rglob(".*.lock")
            with open(lock, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free although the child still runs
        finally:
            child.kill()
            child.join()


def test_a_program_ending_without_closing_its_reader_leaves_the_queued_downloads(store_url, tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    from paths import REPO

    url, _ = store_url
    script = textwrap.dedent(f"""
        import atexit, time
        import numpy as np
        from store import open_store
        reader = open_store({url!r}, cache_dir={str(tmp_path / "cache")!r})
        made, real = [], reader._backend.fs.get_file
        def slow(*args, **kwargs):
            made.append(1)
            time.sleep(0.5)
            return real(*args, **kwargs)
        reader._backend.fs.get_file = slow
        print(reader.prefetch([("t", "image", np.arange({ROWS}))])["started"], flush=True)
        time.sleep(0.2)
        atexit.register(lambda: print(len(made), flush=True))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    asked, made = map(int, done.stdout.split())
    assert asked == 5 and made <= 3  # the (at most three) running downloads finished, the queued never began
