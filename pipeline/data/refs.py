"""Where an image of a canonical dataset is read from: its file under the images root, or its member inside a tar
shard. Shared by the dataset held in memory (`CanonicalDataset`) and the one read in batches (`CanonicalScan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data import bucket
from pipeline.data.rows import RootGuard
from pipeline.data.shards import ShardError, TarMember, check_shard
from pipeline.errors import DsmdError

__all__ = ["ImageRef", "Locator", "root_location", "shard_cache_for"]


def root_location(images_root: str | Path) -> Path | str:
    """The images root as kept in memory and in dataset.json: a resolved local path, or an s3:// URL."""
    if bucket.is_url(images_root):
        return bucket.root_url(str(images_root), "data.images_root")
    return Path(images_root).resolve()


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image row as a scan sees it; the tar fields are set for a dataset in tar shards only."""

    image_id: int
    relpath: str  # the images table's path: relative to the images root, or ``<shard>/<member>``
    shard: int = -1
    member: str = ""
    offset: int = 0
    size: int = 0


class Locator:
    """Turns image rows into what `load_rgb` reads, keeping every path under the images root."""

    def __init__(self, name: str, images_root: Path | str, shards: list[str] | None = None,
                 shard_sizes: list[int] | None = None, shard_sha256: list[str] | None = None):
        self.name = name
        self.in_tars = shards is not None
        self.shard_sizes = list(shard_sizes or [])
        self.shard_sha256 = list(shard_sha256 or []) or [""] * len(self.shard_sizes)
        self.cache = None  # see use_shard_cache
        self.shard_paths: list[Path | str] = []
        if bucket.is_url(images_root):
            # Shards in a bucket: URLs under the root; there are no symlinks to follow out of it.
            self._guard = None
            for shard in shards or []:
                bucket.relative_to_root(f"{images_root}/{shard}", str(images_root), name)
                self.shard_paths.append(f"{images_root}/{shard}")
            return
        # No directory cache: readers live long, and a symlink may change under them.
        self._guard = RootGuard(images_root)
        for shard in shards or []:
            try:
                self.shard_paths.append(Path(self._guard.resolve(shard)))
            except ValueError as exc:
                raise DsmdError(f"{name}: shard {shard!r} {exc}") from None

    def path(self, image_id: int, relpath: str) -> Path:
        """The image file, resolved; checked again here in case a symlink changed after prepare."""
        if self.in_tars:
            raise DsmdError(f"{self.name}: image {image_id} lies inside a tar shard; read it through image_source")
        if self._guard is None:
            raise DsmdError(f"{self.name}: image files are read from local disk only; put them under a local root")
        try:
            return Path(self._guard.resolve(relpath))
        except ValueError as exc:
            raise DsmdError(f"{self.name}: image {image_id} ({relpath!r}) {exc}") from None

    def use_shard_cache(self, cache) -> None:
        """Read shards in a bucket whole through ``cache`` (store.remote.ShardCache), or with a ranged GET per
        image (None). Local shards are read in place either way."""
        self.cache = cache

    def remote_bytes(self) -> int:
        return sum(size for path, size in zip(self.shard_paths, self.shard_sizes, strict=True) if isinstance(path, str))

    def source(self, ref: ImageRef) -> Path | TarMember:
        if not self.in_tars:
            return self.path(ref.image_id, ref.relpath)
        shard = self.shard_paths[ref.shard]
        remote = isinstance(shard, str)
        return TarMember(shard=shard, name=ref.member, offset=ref.offset, size=ref.size,
                         shard_size=self.shard_sizes[ref.shard], sha256=self.shard_sha256[ref.shard] if remote else "",
                         cache=self.cache if remote else None)

    def check_shards(self) -> None:
        """Refuse, in one line, a shard that is missing or changed since it was indexed. Done on opening a
        dataset, so that no stage meets it first inside a loader or Dask worker."""
        remote = [path for path in self.shard_paths if isinstance(path, str)]
        found = bucket.object_sizes(remote) if remote else {}
        for path, size in zip(self.shard_paths, self.shard_sizes, strict=True):
            if isinstance(path, Path):
                check_shard(path, size)
            elif found[path] is None:
                raise ShardError(f"{path}: shard missing; restore it or rerun `dsmd data prepare` without it")
            elif found[path] != size:
                raise ShardError(f"{path}: shard is {found[path]:,} bytes but was {size:,} when indexed (rewritten "
                                 "since); rerun `dsmd data prepare`")


def shard_cache_for(locator_bytes: int, cache, *, in_order: bool):
    """The cache a stage reads a bucket's shards through: always when it reads them in order (each shard is then
    downloaded once), else only when every shard fits it (random access to more shards than the cache holds
    would download a whole shard per image: a ranged GET each is better). None for no remote shards."""
    if locator_bytes == 0:
        return None
    return cache if in_order or locator_bytes <= cache.max_bytes else None
