"""Writing a directory of outputs (a search index, a bundle) as a whole: readers and reruns see the previous
version or the new one, never half of either.

The new version is written into a hidden sibling, then swapped in by two renames on the same file system.
Whatever stops the write (a full disk, an error, Ctrl-C) removes the sibling, and a full disk becomes one line
naming the path; the previous version stays in place, so the rerun after freeing space starts from a clean
state. A sibling left by a killed process is removed by the next write of the same directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DsmdError
from store.fsutil import fsync_dir, is_disk_full

__all__ = ["disk_full_error", "replaced_directory"]


def disk_full_error(path: str | Path, kept: str) -> DsmdError:
    return DsmdError(f"no space left on device writing {path}; free space and rerun: {kept}")


def _leftovers(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    return [p for p in path.parent.iterdir() if p.name.startswith(prefixes)]


def _short_write_on_full_disk(exc: BaseException, directory: Path) -> bool:
    """numpy writes arrays with C's fwrite and reports a short write without an errno ("640000 requested and
    381920 written"): taken as a full disk when the file system has no block left (checked before the staging
    directory is removed, which frees space again)."""
    if not isinstance(exc, OSError) or exc.errno is not None:
        return False
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False


@contextlib.contextmanager
def replaced_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``path``; when the block finishes, it becomes ``path`` (an
    existing ``path`` is replaced). When the block fails, the staging directory is removed and ``path`` is
    untouched; a full disk is raised as a one-line DsmdError naming ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DsmdError(f"{path} is a file, where a directory of outputs goes; move it away or write elsewhere")
    existed = path.is_dir()
    kept = f"the previous {path.name} is kept" if existed else "nothing was left behind"
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in _leftovers(path):
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir()
        yield staging
        if existed:
            # A directory cannot be renamed over a non-empty one: move the old aside, then the new in.
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        full = isinstance(exc, Exception) and (is_disk_full(exc) or _short_write_on_full_disk(exc, path.parent))
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise disk_full_error(path, kept) from None
        raise
