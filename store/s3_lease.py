"""The writer lease of a store on S3: one writing command per store at a time, as the flock of a local store.

Object stores have no locks, but they have conditional writes: the lease is the object `<store>/.dsmd-writer.lock`
(the local lease file's name), created only if absent (If-None-Match: *, s3fs's ``pipe_file(mode="create")``),
so of two commands starting together exactly one gets it. Nothing releases it when its holder dies, so the holder
renews it every RENEW_SECONDS and a lease not renewed for STALE_SECONDS is taken over: a killed writer blocks
the next one for at most that long, and not at all when the next one runs on the same host and finds the
holder's pid gone.

A holder that stops for longer than STALE_SECONDS (SIGSTOP, a laptop asleep, a long GC pause, a network cut) may
lose its lease to a second writer. Every renewal and every takeover is therefore a compare-and-swap: a PUT with
If-Match on the ETag the writer last saw (AWS S3, MinIO, R2 and moto honour it), after reading the object and
checking its token, so a renewal never overwrites a lease taken over meanwhile and two stale takeovers cannot both
win. The store's writer (store/writer.py) asks `check()` before it starts a shard and again just before it PUTs
the shard's completion mark; the holder answers from its last confirmed renewal while that is younger than half
the stale time, and renews at once otherwise, so a holder woken from a long pause learns what happened before
it marks anything, and stops with StoreBusyError naming the store and the new holder.

Processes the holder starts (Dask workers) write without holding the lease: they get its `LeaseFence` (store
URL, token, stale time: picklable) and check, before each shard and each mark, that the lease object still
carries that token and was renewed within the stale time. They stop when the holder lost the lease, and also
when it has not renewed it for the stale time (paused or dead), since a second writer may take over any moment.

What remains: S3 cannot make a write to one object conditional on another, so nothing fences the mark PUT itself.
A writer paused between its check and that PUT (milliseconds) for longer than the stale time can still put one
mark after a takeover. A shard object written over the new holder's after its check is caught by the mark's
sha256 (readers and `dsmd store verify` name it; `dsmd extract --repair` redoes it). Servers that ignore If-Match
leave the read-then-overwrite race of the renewal (a takeover landing between our read and our PUT is
overwritten; the new holder's next renewal then finds our token and it stops). Staleness is judged from the
holder's wall clock: clocks of the hosts involved must agree to well within half the stale time.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime

from store.errors import StoreBusyError
from store.remote import StoreUrl, checked_filesystem, remote_errors, s3_filesystem

__all__ = ["s3_writer_lease", "S3WriterLease", "LeaseFence", "LEASE_KEY", "RENEW_SECONDS", "STALE_SECONDS"]

LEASE_KEY = ".dsmd-writer.lock"
RENEW_SECONDS = 30.0
STALE_SECONDS = 120.0


def _elapsed() -> float:
    """Seconds on a clock that keeps counting while the machine sleeps (CLOCK_MONOTONIC stops on Linux)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


@contextlib.contextmanager
def s3_writer_lease(url: StoreUrl, command: str, *, renew: float = RENEW_SECONDS,
                    stale: float = STALE_SECONDS) -> Iterator[S3WriterLease]:
    lease = S3WriterLease(url, command, renew=renew, stale=stale)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


class S3WriterLease:
    """The holder's side: acquire, renew on a thread, `check()` before writing, release."""

    def __init__(self, url: StoreUrl, command: str, *, renew: float, stale: float) -> None:
        self.url, self.command, self.renew, self.stale = StoreUrl(url), command, renew, stale
        self.fs = checked_filesystem(self.url)
        self.key = f"{self.url.key}/{LEASE_KEY}"
        self.holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(UTC).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
        self.etag: str | None = None  # of our last PUT: the next renewal's If-Match
        self.confirmed = 0.0  # _elapsed() when the lease was last known to be ours
        self.lost: str | None = None  # why writing must stop, once it must
        self._lock = threading.Lock()  # the renewer thread and check() both renew
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def fence(self) -> LeaseFence:
        return LeaseFence(str(self.url), self.holder["token"], self.stale, self.command)

    def acquire(self) -> None:
        with remote_errors(self.url):
            for _ in range(3):  # again when the lease vanished after our create, or another takeover won
                try:
                    self._put(mode="create")
                    break
                except FileExistsError:
                    pass
                etag = _etag(self.fs, self.key)  # before the read: the body judged is at least that new
                current = _read(self.fs, self.key)
                if current is None:
                    continue  # released between our create and our read
                if not _abandoned(current, self.stale):
                    raise StoreBusyError(_busy_message(self.url, self.command, current)) from None
                try:
                    # The takeover: only over the very lease judged stale (a server giving no ETag: over any).
                    self._put(**({"IfMatch": etag} if etag else {}))
                    break
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if not _precondition_failed(exc):
                        raise
            else:
                raise StoreBusyError(_busy_message(self.url, self.command, _read(self.fs, self.key) or {}))
        self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._lock, contextlib.suppress(Exception):  # leaving it behind only delays the next writer by `stale`
            if self.lost or (_read(self.fs, self.key) or {}).get("token") != self.holder["token"]:
                return
            bucket, key = self.key.split("/", 1)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, **self._if_match())
            except OSError as exc:
                if _precondition_failed(exc):
                    return  # taken over after our read
                self.fs.rm_file(self.key)  # a server refusing conditional deletes: the token was checked above
            self.fs.invalidate_cache(self.key)

    def check(self) -> None:
        """Raise StoreBusyError when writing must stop: the lease went to another writer, or could not be renewed
        for the stale time. Called before every shard and every completion mark."""
        with self._lock:
            if self.lost is None and _elapsed() - self.confirmed > self.stale / 2:
                self._renew_locked()  # woken from a pause, or the renewer is failing: find out now
            if self.lost is not None:
                raise StoreBusyError(self.lost)

    def _put(self, **condition) -> None:
        body = json.dumps({**self.holder, "renewed": time.time()}).encode()
        out = self.fs.pipe_file(self.key, body, **condition)
        self.etag = (out or {}).get("ETag")
        self.confirmed = _elapsed()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.renew):
            with self._lock:
                if self.lost is not None:
                    return
                self._renew_locked()

    def _renew_locked(self) -> None:
        """Read, check the token, overwrite only the object read (If-Match). A failed renewal is retried; the lease
        is lost when another holder's token is found, the object is gone, or renewing failed for the stale time."""
        try:
            current = _read(self.fs, self.key)
            if current is None or current.get("token") != self.holder["token"]:
                self.lost = _lost_message(self.url, self.command, current, _elapsed() - self.confirmed)
                return
            self._put(**self._if_match())
        except FileNotFoundError:  # If-Match on an object deleted meanwhile
            self.lost = _lost_message(self.url, self.command, None, _elapsed() - self.confirmed)
        except Exception as exc:  # noqa: BLE001 - any failure to renew is judged by how long it lasts
            if isinstance(exc, OSError) and _precondition_failed(exc):
                current = None
                with contextlib.suppress(Exception):
                    current = _read(self.fs, self.key)
                self.lost = _lost_message(self.url, self.command, current or {}, _elapsed() - self.confirmed)
            elif _elapsed() - self.confirmed > self.stale:
                error = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                self.lost = (f"{self.url}: `{self.command}` could not renew its writer lease for "
                             f"{_elapsed() - self.confirmed:.0f} s (more than {self.stale:g} s; last error: "
                             f"{error}), so another writer may have taken the store over: it stops before marking "
                             f"more shards. The shards it finished are kept; rerun `{self.command}` once the store "
                             "is reachable")

    def _if_match(self) -> dict:
        # No ETag in a server's answer: renewals fall back to read, check the token, overwrite.
        return {"IfMatch": self.etag} if self.etag else {}


@dataclass(frozen=True)
class LeaseFence:
    """What a process started by the holder (a Dask worker) needs to check the holder's lease: picklable."""

    url: str
    token: str
    stale: float
    command: str
    _fs: object = field(default=None, compare=False, repr=False)  # made on first use, in the worker

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_fs"}

    def check(self) -> None:
        url = StoreUrl(self.url)
        with remote_errors(url):
            if self._fs is None:
                object.__setattr__(self, "_fs", s3_filesystem())
            current = _read(self._fs, f"{url.key}/{LEASE_KEY}")
        if current is None or current.get("token") != self.token:
            raise StoreBusyError(_lost_message(url, self.command, current, None))
        renewed = current.get("renewed")
        age = time.time() - renewed if isinstance(renewed, (int, float)) else float("inf")
        if age > self.stale:
            raise StoreBusyError(
                f"{url}: the writer lease of the `{self.command}` that started this worker was last renewed "
                f"{age:.0f} s ago (more than {self.stale:g} s): its holder is paused, cut off or gone, and another "
                "writer may take the store over, so this worker stops before marking more shards. The shards it "
                f"finished are kept; rerun `{self.command}`"
            )


def _read(fs, key: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: treated as a holder that never renewed


def _etag(fs, key: str) -> str | None:
    try:
        return fs.info(key, refresh=True).get("ETag")
    except FileNotFoundError:
        return None


def _precondition_failed(exc: OSError) -> bool:
    """s3fs turns a failed If-Match (HTTP 412) into a plain OSError(EINVAL): the botocore error it came from says."""
    response = getattr(exc.__cause__, "response", None) or {}
    return (response.get("Error", {}).get("Code") == "PreconditionFailed"
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412)


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


def _who(current: dict) -> tuple[str, str]:
    """(`command`, " (pid P on host H, since S)") of a lease's holder, as far as the lease says."""
    who = f"`{current['command']}`" if current.get("command") else "dsmd command"
    where = (f" (pid {current.get('pid')} on host {current.get('host')}, since {current.get('since')})"
             if current.get("host") else "")
    return who, where


def _busy_message(url: StoreUrl, command: str, current: dict) -> str:
    who, where = _who(current)
    return (f"another {who} is writing {url}{where}; wait for it to finish (or stop it), then run `{command}` "
            f"again: the shards it finished are kept. A writer that was killed holds the store for at most "
            f"{STALE_SECONDS:.0f} s after its last renewal")


def _lost_message(url: StoreUrl, command: str, current: dict | None, unconfirmed: float | None) -> str:
    silent = f" after {unconfirmed:.0f} s without renewing it (paused, asleep or cut off?)" if unconfirmed else ""
    taker = (f"to another {''.join(_who(current))}" if current is not None
             else "(its lease object is gone: deleted by another command?)")
    return (f"{url}: `{command}` lost its writer lease {taker}{silent}; it stops before marking more shards so as "
            f"not to overwrite the other writer's work. The shards it finished are kept; let the other writer finish, "
            f"then rerun `{command}` if the store is still incomplete")
