"""The S3 writer lease when its holder stalls (store/s3_lease.py), against a real local S3 server (moto).

A pause longer than the stale time (SIGSTOP, a laptop asleep) is simulated by a tiny stale time and a renewal
interval far longer than the test: the holder then renews only when its writer checks the lease."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "dsmd-lease"
NEVER = 3600.0  # a renewal interval no test outlives: the renewer thread stays asleep


S3_BUCKET = BUCKET  # created by the `s3` fixture (tests/conftest.py)


def objects():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def lease_key(url: str) -> str:
    from store.s3_lease import LEASE_KEY

    return f"{url.removeprefix('s3://')}/{LEASE_KEY}"


def new_store(url: str, lease):
    from store.writer import FeatureStore

    store = FeatureStore.create_or_open(url, dataset_fingerprint="fp", n_images=32, n_captions=4, rows_per_shard=8,
                                        rows_per_chunk=8, lease=lease)
    store.ensure_array("t", "image", 4)
    return store


def rows(seed: int) -> np.ndarray:
    from store.testing import unit_rows

    return unit_rows(8, 4, seed=seed)


def test_a_holder_whose_lease_was_taken_over_mid_shard_refuses_to_mark_it(s3):
    """Paused between writing a shard's data and its mark, the holder finds a second writer holding the store when
    it wakes: it stops with one line naming the store and the new holder, writes no mark, clears nothing, and
    leaves the new holder's lease in place."""
    from store.errors import StoreBusyError
    from store.s3_lease import s3_writer_lease

    url = f"s3://{BUCKET}/taken/features.zarr"
    fs = objects()
    second = []
    with s3_writer_lease(url, "dsmd extract", renew=NEVER, stale=0.5) as lease, new_store(url, lease) as store:
        store.write_shard("t", "image", 0, rows(0))  # the normal path: marked
        backend = store._backend
        write_rows = backend.write_rows

        def paused_after_the_data(*args):
            done = write_rows(*args)
            time.sleep(0.7)  # past the stale time: a second writer takes the store over meanwhile
            second.append(s3_writer_lease(url, "dsmd store convert", stale=0.5))
            second[0].__enter__()
            return done

        backend.write_rows = paused_after_the_data
        with pytest.raises(StoreBusyError) as caught:
            store.write_shard("t", "image", 1, rows(1))
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{url}: `dsmd extract` lost its writer lease to another `dsmd store convert` "
                                  f"(pid {os.getpid()} on host {socket.gethostname()}, since ")
        assert "it stops before marking more shards" in message
        assert backend.read_mark("t", "image", 1) is None  # no mark vouches for the shard
        assert fs.exists(backend.shard_file("t", "image", 1).key)  # and nothing was cleared
        assert backend.read_mark("t", "image", 0) is not None
        with pytest.raises(StoreBusyError, match="lost its writer lease"):  # nor does it start another shard
            store.write_shard("t", "image", 2, rows(2))
    assert json.loads(fs.cat_file(lease_key(url)))["command"] == "dsmd store convert"  # leaving kept it
    second[0].__exit__(None, None, None)
    assert not fs.exists(lease_key(url))


def test_the_normal_path_and_a_pause_nobody_used_are_unchanged(s3):
    """A holder renewing on time writes every shard while a second writer is refused; a holder paused past the
    stale time that nobody replaced renews when it wakes and goes on."""
    from store.errors import StoreBusyError
    from store.s3_lease import s3_writer_lease

    url = f"s3://{BUCKET}/normal/features.zarr"
    fs = objects()
    with s3_writer_lease(url, "dsmd extract", renew=0.1, stale=2.0) as lease, new_store(url, lease) as store:
        for shard in range(3):
            store.write_shard("t", "image", shard, rows(shard))
            time.sleep(0.3)
            with pytest.raises(StoreBusyError, match="another `dsmd extract` is writing"):
                with s3_writer_lease(url, "dsmd store convert", stale=2.0):
                    pass
        assert store.pending_shards("t", "image") == [3]
    assert not fs.exists(lease_key(url))

    with s3_writer_lease(url, "dsmd extract", renew=NEVER, stale=0.3) as lease, new_store(url, lease) as store:
        before = json.loads(fs.cat_file(lease_key(url)))["renewed"]
        time.sleep(0.5)  # stale by now, but nobody came
        store.write_shard("t", "image", 3, rows(3))
        assert json.loads(fs.cat_file(lease_key(url)))["renewed"] > before
        assert store.complete("t", "image")


def test_a_renewal_never_overwrites_a_lease_that_changed(s3):
    """The renewer finds another holder's token and stops instead of writing over it; and a lease object that
    changed since the holder's last write (another ETag), even with the holder's own token, is not overwritten:
    the renewal is conditional (If-Match)."""
    from store.errors import StoreBusyError
    from store.s3_lease import s3_writer_lease

    url = f"s3://{BUCKET}/renewal/features.zarr"
    key = lease_key(url)
    fs = objects()
    other = {"command": "dsmd extract", "pid": 1, "host": "elsewhere", "since": "then", "token": "theirs",
             "renewed": time.time()}
    with s3_writer_lease(url, "dsmd extract", renew=0.1, stale=60) as lease:
        fs.pipe_file(key, json.dumps(other).encode())  # taken over while this holder was away
        time.sleep(0.5)  # several renewal ticks
        assert json.loads(fs.cat_file(key))["token"] == "theirs"
        with pytest.raises(StoreBusyError, match=r"lost its writer lease to another `dsmd extract` \(pid 1 on host "
                                                 r"elsewhere, since then\)"):
            lease.check()
    assert json.loads(fs.cat_file(key))["token"] == "theirs"  # leaving did not delete it either
    fs.rm_file(key)

    with s3_writer_lease(url, "dsmd extract", renew=NEVER, stale=0.3) as lease:
        mine = json.loads(fs.cat_file(key))
        rewritten = json.dumps({**mine, "renewed": mine["renewed"] + 1}).encode()
        fs.pipe_file(key, rewritten)
        time.sleep(0.4)
        with pytest.raises(StoreBusyError, match="lost its writer lease"):
            lease.check()
        assert fs.cat_file(key) == rewritten
    fs.rm_file(key)


def test_a_lease_that_cannot_be_renewed_for_the_stale_time_is_lost(s3):
    """Cut off from the store (here: its requests go to a port nobody listens on) for longer than the stale
    time, the holder cannot know whether another writer took over, so it stops."""
    import s3fs
    from s3_helpers import free_port

    from store.errors import StoreBusyError
    from store.s3_lease import s3_writer_lease

    url = f"s3://{BUCKET}/cut/features.zarr"
    with s3_writer_lease(url, "dsmd extract", renew=0.1, stale=0.5) as lease:
        reachable = lease.fs
        lease.fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={
            "endpoint_url": f"http://127.0.0.1:{free_port()}"}, config_kwargs={"retries": {"max_attempts": 1}})
        time.sleep(1.0)
        with pytest.raises(StoreBusyError, match=r"could not renew its writer lease for \d+ s \(more than 0.5 s; last "
                                                 r"error: .*\), so another writer may have taken the store over"):
            lease.check()
        lease.fs = reachable
    objects().rm_file(lease_key(url))


def test_a_dask_workers_fence_stops_it_once_the_holder_lost_or_stopped_renewing(s3):
    """A worker holds only the lease's fence (pickled to it): it writes while the lease is its holder's and
    fresh, and stops with one line once another writer holds it or the holder stopped renewing it."""
    from store.errors import StoreBusyError
    from store.s3_lease import s3_writer_lease

    url = f"s3://{BUCKET}/fenced/features.zarr"
    key = lease_key(url)
    fs = objects()
    with s3_writer_lease(url, "dsmd extract", renew=NEVER, stale=3.0) as lease:
        fence = pickle.loads(pickle.dumps(lease.fence))
        with new_store(url, fence) as store:
            store.write_shard("t", "image", 0, rows(0))
            time.sleep(3.2)  # the holder is paused: no renewal
            with pytest.raises(StoreBusyError, match=r"the writer lease of the `dsmd extract` that started this "
                                                     r"worker was last renewed \d+ s ago \(more than 3 s\)"):
                store.write_shard("t", "image", 1, rows(1))
            lease.check()  # the holder wakes: nobody took over, so it renews ...
            store.write_shard("t", "image", 1, rows(1))  # ... and its workers go on
            fs.pipe_file(key, json.dumps({"command": "dsmd extract", "pid": 1, "host": "elsewhere", "since": "then",
                                          "token": "theirs", "renewed": time.time()}).encode())
            with pytest.raises(StoreBusyError, match=r"lost its writer lease to another `dsmd extract` \(pid 1 on "
                                                     "host elsewhere"):
                store.write_shard("t", "image", 2, rows(2))
            assert store.pending_shards("t", "image") == [2, 3]
    fs.rm_file(key)


PAUSED_HOLDER = """
import sys, time
sys.path[:0] = sys.argv[2:]
from test_store_s3_lease import new_store, rows
from store.errors import StoreBusyError
from store.s3_lease import s3_writer_lease

url = sys.argv[1]
with s3_writer_lease(url, "dsmd extract", renew=0.2, stale=1.0) as lease, new_store(url, lease) as store:
    store.write_shard("t", "image", 0, rows(0))
    print("ready", flush=True)
    time.sleep(0.5)  # stopped in here: between shards, as the pause between check and mark PUT is not caught
    try:
        for shard in (1, 2, 3):
            store.write_shard("t", "image", shard, rows(shard))
    except StoreBusyError as exc:
        print(exc, flush=True)
        sys.exit(3)
"""


def test_a_holder_stopped_with_sigstop_past_the_stale_time_stops_when_it_wakes(s3):
    """A real pause: the holder (a subprocess) is SIGSTOPped, a second writer takes the store over, SIGCONT: the
    holder writes no further mark and exits with the one line naming the new holder."""
    from store.s3_lease import s3_writer_lease

    url = f"s3://{BUCKET}/stopped/features.zarr"
    fs = objects()
    tests = Path(__file__).resolve().parent
    holder = subprocess.Popen([sys.executable, "-c", PAUSED_HOLDER, url, str(tests.parent), str(tests)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(1.5)  # past the stale time; requests it had in flight have landed
        marked = fs.glob(f"{BUCKET}/stopped/features.zarr/t/image/marks/*.json")
        assert [name.rsplit("/", 1)[-1] for name in marked] == ["shard-000000.json"]
        with s3_writer_lease(url, "dsmd store convert", stale=1.0):
            os.kill(holder.pid, signal.SIGCONT)
            output = holder.communicate(timeout=60)[0]
            assert holder.returncode == 3, output
            assert fs.glob(f"{BUCKET}/stopped/features.zarr/t/image/marks/*.json") == marked
            assert json.loads(fs.cat_file(lease_key(url)))["command"] == "dsmd store convert"
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
    line = next((text for text in output.splitlines() if text.startswith("s3://")), output)  # aiohttp may add noise
    assert line.startswith(f"{url}: `dsmd extract` lost its writer lease to another `dsmd store convert` (pid "
                           f"{os.getpid()} on host "), output
