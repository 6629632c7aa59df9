"""WebDataset shards in an S3-compatible bucket: ``data.source: s3://bucket/prefix`` (a prefix holding ``*.tar``
shards, or one ``.tar`` object) under ``data.images_root: s3://bucket/...``, a prefix containing it.

The canonical dataset keeps shard paths relative to that root, exactly as for local shards, so the same shards
prepared from disk or from the bucket give the same fingerprint, and moving them to another bucket needs only
``images_root`` changed. The endpoint and credentials are the standard AWS settings that the feature store on
S3 reads (store/remote.py).

- Prepare downloads each shard (and its img2dataset ``.parquet``) once, whole, to a temporary file beside the
  canonical directory, indexes it there with the local code and deletes it: walking a tar's headers needs its
  bytes in order anyway, and one GET per shard beats a ranged GET per header.
- Later reads: a stage that reads shards in order (check, extract, evaluate; distill in blocks order or when the
  shards fit the cache) gives the dataset a local shard cache (extract.cache_dir / cache_gb, shared with the
  store's remote shards), and each shard is downloaded once, whole, checked against the sha256 prepare recorded
  (`cached_copy`), then read by offset. Without one, each image is one ranged GET of exactly its bytes
  (`read_range`): right for random access to more shards than the cache holds. The shards' sizes are checked
  when the dataset is opened (one listing per prefix), as a local shard's are.
- Failures are one line naming the URL: unreachable endpoint, refused credentials, missing bucket or shard.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DsmdError

__all__ = ["is_url", "BucketError", "root_url", "relative_to_root", "list_tar_objects", "listing_digest_rows",
           "download", "object_sizes", "read_range", "cached_copy", "file_sha256",
           "local_shard_cache"]

SCHEME = "s3://"


class BucketError(DsmdError):
    """The bucket or a shard in it cannot be used: one line naming the URL and the fix."""


def is_url(value: object) -> bool:
    return isinstance(value, str) and "://" in value


def root_url(value: str, setting: str) -> str:
    if not value.startswith(SCHEME):
        raise BucketError(f"{setting} {value!r}: only s3:// URLs are read from object storage")
    url = value.rstrip("/")
    if not url[len(SCHEME):]:
        raise BucketError(f"{setting} {value!r}: name a bucket, e.g. s3://bucket/shards")
    return url


def relative_to_root(url: str, root: str, where: str) -> str:
    """``url`` as a path under ``root`` (both s3:// URLs); refused when it is not inside it."""
    if url == root or not url.startswith(root + "/"):
        raise BucketError(f"{where}: {url} is not inside data.images_root {root}; set data.images_root to a prefix "
                          "of data.source")
    relative = url[len(root) + 1:]
    if any(part in ("", ".", "..") for part in relative.split("/")):
        raise BucketError(f"{where}: {url} has an empty, '.' or '..' path component")
    return relative


def _filesystem():
    """An s3fs filesystem. fsspec keeps one instance per process, thread and arguments, so the many ranged reads
    of a loader share one connection pool; the endpoint and key id are part of the arguments, so a changed
    setting gets a new instance rather than a stale one."""
    try:
        import s3fs
    except ImportError:
        raise BucketError("shards in a bucket need s3fs: pip install 'dsmd[s3]'") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return s3fs.S3FileSystem(
        key=os.environ.get("AWS_ACCESS_KEY_ID"), secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        client_kwargs={"endpoint_url": endpoint} if endpoint else {}, use_listings_cache=False,
        config_kwargs={"connect_timeout": 10, "retries": {"max_attempts": 3}},
    )


@contextmanager
def _errors(url: str) -> Iterator[None]:
    from store.errors import StoreError
    from store.remote import remote_problem

    try:
        yield
    except DsmdError:
        raise
    except FileNotFoundError:
        raise BucketError(f"{url}: no such object; restore the shard or rerun `dsmd data prepare`") from None
    except StoreError as exc:
        raise BucketError(str(exc)) from None
    except Exception as exc:
        message = remote_problem(url, exc)
        if message is None:
            raise BucketError(f"{url}: cannot read it ({type(exc).__name__}: {str(exc)[:200]})") from None
        raise BucketError(message) from None


def _key(url: str) -> str:
    return url[len(SCHEME):]


def list_tar_objects(source: str) -> list[tuple[str, int]]:
    """The ``.tar`` objects of ``source`` (URLs, name order, with sizes): the one object, or those directly
    under the prefix."""
    fs = _filesystem()
    with _errors(source):
        if source.endswith(".tar") and fs.isfile(_key(source)):
            return [(source, int(fs.info(_key(source))["size"]))]
        try:
            entries = fs.ls(_key(source), detail=True, refresh=True)
        except FileNotFoundError:
            entries = []  # an empty prefix: said below
    shards = sorted((SCHEME + e["name"], int(e["size"])) for e in entries
                    if e.get("type") == "file" and e["name"].endswith(".tar")
                    and not posixpath.basename(e["name"]).startswith("."))
    if not shards:
        compressed = sorted(e["name"] for e in entries if ".tar." in posixpath.basename(e["name"]))
        hint = f" (found compressed {posixpath.basename(compressed[0])}: decompress the shards first)" if compressed \
            else ""
        raise BucketError(f"data.source {source!r}: no .tar shards under this prefix{hint}; set data.source")
    return shards


def object_sizes(urls: list[str]) -> dict[str, int | None]:
    """Size of each object (None when absent), from one listing per prefix rather than a request per object."""
    fs = _filesystem()
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(posixpath.dirname(url), []).append(url)
    sizes: dict[str, int | None] = {}
    for parent, members in by_parent.items():
        with _errors(parent):
            try:
                listed = {SCHEME + e["name"]: int(e["size"]) for e in fs.ls(_key(parent), detail=True, refresh=True)
                          if e.get("type") == "file"}
            except FileNotFoundError:
                listed = {}
        sizes.update((url, listed.get(url)) for url in members)
    return sizes


def listing_digest_rows(source: str) -> list[str]:
    """One line per shard and img2dataset table (name, size, ETag), for telling whether the source changed."""
    fs = _filesystem()
    rows = []
    for url, _ in list_tar_objects(source):
        for candidate in (url, url[: -len(".tar")] + ".parquet"):
            with _errors(candidate):
                try:
                    info = fs.info(_key(candidate), refresh=True)
                except FileNotFoundError:
                    continue
            rows.append(f"{posixpath.basename(candidate)}\x00{info.get('size')}\x00{info.get('ETag', '')}")
    return rows


def download(url: str, target: Path, *, optional: bool = False) -> bool:
    """Copy the object to ``target``; False (nothing copied) for an absent ``optional`` object."""
    fs = _filesystem()
    with _errors(url):
        try:
            fs.get_file(_key(url), str(target))
        except FileNotFoundError:
            if optional:
                return False
            raise
    return True


def file_sha256(path: Path) -> str:
    """Of a local file (a downloaded shard, or a source table), read a MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_copy(url: str, size: int, sha256: str, cache) -> Path:
    """The whole shard in the local ``cache`` (store.remote.ShardCache), downloaded once (also across threads
    and processes sharing the cache) and checked against the sha256 prepare recorded."""

    def download(tmp: Path) -> None:
        _filesystem().get_file(_key(url), str(tmp))

    # The cache checks the copy's size and sha256 (once) against what prepare recorded.
    with _errors(url):
        return cache.fetch(cache.path_for(posixpath.dirname(url), posixpath.basename(url), sha256), download, size,
                           sha256, url, changed="the shard changed since it was prepared; rerun `dsmd data prepare`")


def local_shard_cache(cache_dir: str, cache_gb: float):
    """The local cache for shards in a bucket: the one the store's remote shards use (extract.cache_dir,
    extract.cache_gb), so one budget bounds both."""
    from store.remote import ShardCache

    return ShardCache(cache_dir or None, int(cache_gb * 2**30))


def read_range(url: str, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes from ``offset`` (fewer when the object is shorter: the caller says truncated)."""
    if size == 0:
        return b""
    fs = _filesystem()
    with _errors(url):
        return fs.cat_file(_key(url), start=offset, end=offset + size)
