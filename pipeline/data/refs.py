"""Where an image of a canonical dataset is read from: its file under the images root, or its member inside a tar
shard. Shared by the dataset held in memory (`CanonicalDataset`) and the one read in batches (`CanonicalScan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.rows import RootGuard
from pipeline.data.shards import TarMember, check_shard
from pipeline.errors import DsmdError

__all__ = ["ImageRef", "Locator"]


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

    def __init__(self, name: str, images_root: Path, shards: list[str] | None = None,
                 shard_sizes: list[int] | None = None):
        self.name = name
        # No directory cache: readers live long, and a symlink may change under them.
        self._guard = RootGuard(images_root)
        self.in_tars = shards is not None
        self.shard_sizes = list(shard_sizes or [])
        self.shard_paths: list[Path] = []
        for shard in shards or []:
            try:
                self.shard_paths.append(Path(self._guard.resolve(shard)))
            except ValueError as exc:
                raise DsmdError(f"{name}: shard {shard!r} {exc}") from None

    def path(self, image_id: int, relpath: str) -> Path:
        """The image file, resolved; checked again here in case a symlink changed after prepare."""
        if self.in_tars:
            raise DsmdError(f"{self.name}: image {image_id} lies inside a tar shard; read it through image_source")
        try:
            return Path(self._guard.resolve(relpath))
        except ValueError as exc:
            raise DsmdError(f"{self.name}: image {image_id} ({relpath!r}) {exc}") from None

    def source(self, ref: ImageRef) -> Path | TarMember:
        if not self.in_tars:
            return self.path(ref.image_id, ref.relpath)
        return TarMember(shard=self.shard_paths[ref.shard], name=ref.member, offset=ref.offset, size=ref.size,
                         shard_size=self.shard_sizes[ref.shard])

    def check_shards(self) -> None:
        """Refuse, in one line, a shard that is missing or changed since it was indexed. Done on opening a
        dataset, so that no stage meets it first inside a loader or Dask worker."""
        for path, size in zip(self.shard_paths, self.shard_sizes, strict=True):
            check_shard(path, size)
