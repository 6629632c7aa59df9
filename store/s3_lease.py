"""The writer lease of a store on S3: one writing command per store at a time, as the flock of a local store.

Object stores have no locks, but they have conditional writes: the lease is the object `<store>/.dsmd-writer.lock`
(the local lease file's name), created only if absent (If-None-Match: *, s3fs's ``pipe_file(mode="create")``),
so of two commands starting together exactly one gets it. Nothing releases it when its holder dies, so the holder
renews it every RENEW_SECONDS and a lease not renewed for STALE_SECONDS is taken over: a killed writer blocks
the next one for at most that long, and not at all when the next one runs on the same host and finds the
holder's pid gone. Processes the holder starts (Dask workers) write without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

from store.errors import StoreBusyError
from store.remote import StoreUrl, checked_filesystem, remote_errors

__all__ = ["s3_writer_lease", "LEASE_KEY", "RENEW_SECONDS", "STALE_SECONDS"]

LEASE_KEY = ".dsmd-writer.lock"
RENEW_SECONDS = 30.0
STALE_SECONDS = 120.0


@contextlib.contextmanager
def s3_writer_lease(url: StoreUrl, command: str, *, renew: float = RENEW_SECONDS,
                    stale: float = STALE_SECONDS) -> Iterator[None]:
    fs = checked_filesystem(url)
    key = f"{url.key}/{LEASE_KEY}"
    holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
    _acquire(fs, url, key, holder, stale)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew_until, args=(fs, key, holder, stop, renew), daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(Exception):  # leaving it behind only delays the next writer by `stale`
            if (_read(fs, key) or {}).get("token") == holder["token"]:
                fs.rm_file(key)


def _put(fs, key: str, holder: dict, create: bool) -> None:
    body = json.dumps({**holder, "renewed": time.time()}).encode()
    fs.pipe_file(key, body, mode="create" if create else "overwrite")


def _read(fs, key: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: treated as a holder that never renewed


def _acquire(fs, url: StoreUrl, key: str, holder: dict, stale: float) -> None:
    with remote_errors(url):
        for _ in range(2):  # a second try after removing a stale or vanished lease
            try:
                _put(fs, key, holder, create=True)
                return
            except FileExistsError:
                current = _read(fs, key)
                if current is None:
                    continue  # released between our create and our read
                if not _abandoned(current, stale):
                    raise StoreBusyError(_busy_message(url, holder["command"], current)) from None
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(key)
        current = _read(fs, key) or {}
        raise StoreBusyError(_busy_message(url, holder["command"], current))


def _abandoned(current: dict, stale: float) -> bool:
    renewed = current.get("renewed")
    if not isinstance(renewed, (int, float)) or time.time() - renewed > stale:
        return True
    if current.get("host") == socket.gethostname() and isinstance(current.get("pid"), int):
        try:
            os.kill(current["pid"], 0)
        except ProcessLookupError:
            return True  # its holder on this host is gone (killed): no need to wait for it to go stale
        except PermissionError:
            return False
    return False


def _renew_until(fs, key: str, holder: dict, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        with contextlib.suppress(Exception):  # a missed renewal is retried; the lease goes stale only after several
            _put(fs, key, holder, create=False)


def _busy_message(url: StoreUrl, command: str, current: dict) -> str:
    who = f"`{current['command']}`" if current.get("command") else "dsmd command"
    where = (f" (pid {current.get('pid')} on host {current.get('host')}, since {current.get('since')})"
             if current.get("host") else "")
    return (f"another {who} is writing {url}{where}; wait for it to finish (or stop it), then run `{command}` "
            f"again: the shards it finished are kept. A writer that was killed holds the store for at most "
            f"{STALE_SECONDS:.0f} s after its last renewal")
