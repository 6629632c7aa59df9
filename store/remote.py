"""Store locations on S3-compatible object storage: URLs, the s3fs filesystem, one-line errors, a shard cache.

A store path that starts with ``s3://`` lives in a bucket; anything else is a local path and never goes
through fsspec (local reads map shard files directly, as before). The endpoint and credentials come from the
standard AWS settings that boto reads itself: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a
non-AWS server such as MinIO or Ceph, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` and
``AWS_DEFAULT_REGION``; dsmd adds no variables of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from store.errors import StoreError

SCHEME = "s3://"
# Readers keep at most this much of a remote store's shards on local disk unless told otherwise.
DEFAULT_CACHE_BYTES = 8 << 30


def is_remote(path: object) -> bool:
    return isinstance(path, str) and "://" in path


class StoreUrl(str):
    """An ``s3://bucket/key`` store location that joins like a Path (``url / "teacher" / "image"``), so that
    messages and the code shared with local stores read the same; it is a str, never a Path."""

    def __truediv__(self, other: object) -> StoreUrl:
        return StoreUrl(f"{self.rstrip('/')}/{other}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name[1:] else ""

    @property
    def key(self) -> str:
        """bucket/key, as s3fs names objects."""
        return self[len(SCHEME):].rstrip("/")

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]


def store_location(path: str | os.PathLike) -> Path | StoreUrl:
    """A local Path, or a StoreUrl for ``s3://`` (other URL schemes are refused by name)."""
    if isinstance(path, StoreUrl):
        return path
    if is_remote(path):
        text = str(path)
        if not text.startswith(SCHEME):
            raise StoreError(f"{text}: only local paths and s3:// URLs can hold a feature store")
        url = StoreUrl(text.rstrip("/"))
        if "/" not in url.key or not url.bucket:
            example = f"s3://{url.bucket or 'bucket'}/features.zarr"
            raise StoreError(f"{text}: give a key prefix inside the bucket, e.g. {example}")
        return url
    return Path(path)


def s3_filesystem():
    """A fresh s3fs filesystem (no listing cache: other processes write the same store)."""
    try:
        import s3fs
    except ImportError:
        raise StoreError("s3:// stores need s3fs: pip install 'dsmd[s3]'") from None
    # One attempt with a short connect timeout: an unreachable endpoint is reported in seconds, not minutes.
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                             config_kwargs={"connect_timeout": 10, "retries": {"max_attempts": 2}})


def checked_filesystem(url: StoreUrl):
    """s3_filesystem(), after a look at the bucket: an unreachable endpoint, a missing bucket or refused credentials
    are reported here in one line naming `url`, not later as a misleading "not found"."""
    fs = s3_filesystem()
    with remote_errors(url):
        fs.ls(url.bucket)
    return fs


def remote_problem(url: str, exc: BaseException) -> str | None:
    """The one-line message for a storage failure (reachability, bucket, credentials), or None for others."""
    name = type(exc).__name__
    text = str(exc)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default"
    bucket = StoreUrl(url).bucket if str(url).startswith(SCHEME) else url
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionClosedError") \
            or "Could not connect to the endpoint" in text:
        return (f"{url}: cannot reach the object store at {endpoint}; check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) "
                "and that the server is up and reachable from here")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if isinstance(exc, PermissionError) or any(code in text for code in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "InvalidToken")):
        return (f"{url}: the object store at {endpoint} refused the credentials ({text.splitlines()[0][:120]}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return (f"{url}: bucket {bucket!r} does not exist at {endpoint}; create it (e.g. `aws s3 mb s3://{bucket}`) "
                "or fix the store URL")
    return None


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Storage failures (unreachable, no bucket, bad credentials) become one StoreError line naming the URL."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        message = remote_problem(url, exc)
        if message is None:
            raise
        raise StoreError(message) from None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsmd" / "store-cache"


_STORE_SHARD_CHANGED = ("the shard object changed after its completion mark was written; run `dsmd store verify` on "
                        "the store, then `dsmd extract --repair`")


class ShardCache:
    """Whole shard files of remote stores on local disk, at most `max_bytes` in all (least recently used go
    first), so that readers map them like local shards. Files are named by the shard's sha256 from its
    completion mark: a rewritten shard never reads an old copy, and a copy is checked before it is used.
    Several processes may share the directory: files appear by atomic rename, and a file evicted while
    another process has it mapped stays readable to that process."""

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.max_bytes = DEFAULT_CACHE_BYTES if max_bytes is None else int(max_bytes)
        if self.max_bytes < 1:
            raise StoreError(f"store cache size must be positive, got {self.max_bytes} bytes")

    def path_for(self, store: str, name: str, sha256: str) -> Path:
        scope = hashlib.sha256(store.encode()).hexdigest()[:16]
        return self.directory / scope / f"{name}-{sha256[:24]}"

    def fetch(self, target: Path, download: Callable[[Path], None], size: int, sha256: str, where: str,
              changed: str = _STORE_SHARD_CHANGED) -> Path:
        """`target` (from path_for), downloading it with `download(tmp)` when absent; the download must have
        the given size and sha256, else StoreError naming `where` and saying `changed` (what a mismatch means
        and its fix). One download per file at a time: a caller (thread or process) that finds another
        downloading the same file waits for it and uses its copy."""
        if self.touch(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with _download_lock(target):
            if self.touch(target):  # another thread or process downloaded it while we waited
                return target
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            try:
                download(tmp)
                digest, got = _sha256(tmp)
                if got != size or digest != sha256:
                    raise StoreError(f"{where}: {changed} (downloaded {got} bytes with sha256 {digest[:12]}, "
                                     f"expected {size} bytes with sha256 {sha256[:12]})")
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        self.evict(keep=target)
        return target

    @staticmethod
    def touch(target: Path) -> bool:
        """Mark a cached file most recently used (so that eviction takes others first); False when absent."""
        try:
            os.utime(target)
        except OSError:
            return False
        return target.is_file()

    def evict(self, keep: Path | None = None) -> None:
        entries = []
        for root, _, files in os.walk(self.directory):
            for name in files:
                path = Path(root) / name
                with contextlib.suppress(OSError):
                    stat = path.stat()
                    entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if path == keep or name_is_temporary(path):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())


def name_is_temporary(path: Path) -> bool:
    """A download in progress, or the lock file that serialises downloads of one shard (both hold no data)."""
    return path.name.startswith(".") and (".tmp-" in path.name or path.name.endswith(".lock"))


# Lock files this process holds while downloading. A forked child (a data-loader worker forked while a prefetch
# thread downloads) inherits their descriptors, and an flock lasts while any descriptor of it is open: the lock
# would outlive the download and stall every later reader of that shard. The child closes its copies at once.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)  # a close (not LOCK_UN): the parent's lock stays held until its own download ends
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def _download_lock(target: Path) -> Iterator[None]:
    """Held while `target` downloads. An flock on a file of its own, opened afresh by each caller, so that it
    excludes other threads of this process as well as other processes (a cache shared by loader workers and
    DDP ranks). The empty lock file stays: deleting it could let a second downloader lock a new file while the
    first still holds the old one."""
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _HELD_LOCKS.add(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # closing releases the flock


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
