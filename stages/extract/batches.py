"""Image batches for the teacher: decoding in loader workers, bad images turned into recorded skips."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.images import BadImageError, load_rgb


@dataclass
class ImageBatch:
    ids: torch.Tensor  # int64 image ids
    pixels: torch.Tensor  # only the rows that decoded
    ok: torch.Tensor  # bool per id: decoded and present in pixels
    reasons: list[str]  # "" for good rows


class _ImageRows(Dataset):
    def __init__(self, ids: Sequence[int], paths: Callable[[int], Path], transform, known_bad: dict[int, str]):
        self.ids = list(ids)
        self.paths = paths
        self.transform = transform
        self.known_bad = known_bad

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        if image_id in self.known_bad:
            return image_id, None, self.known_bad[image_id]
        try:
            path = self.paths(image_id)
            image = load_rgb(path)
        except BadImageError as exc:
            return image_id, None, str(exc)
        except Exception as exc:  # a path that escapes its root, a decoder bug: a skip, never a crash
            return image_id, None, f"{type(exc).__name__}: {exc}"
        return image_id, self.transform(image), ""


def _collate(items) -> ImageBatch:
    ids = torch.tensor([item[0] for item in items], dtype=torch.int64)
    good = [item[1] for item in items if item[1] is not None]
    pixels = torch.stack(good) if good else torch.empty(0)
    ok = torch.tensor([item[1] is not None for item in items], dtype=torch.bool)
    return ImageBatch(ids=ids, pixels=pixels, ok=ok, reasons=[item[2] for item in items])


def image_batches(
    ids: Sequence[int],
    paths: Callable[[int], Path],
    transform,
    *,
    batch_size: int,
    workers: int,
    known_bad: dict[int, str] | None = None,
    pin_memory: bool = False,
) -> Iterator[ImageBatch]:
    """Batches in the order of ids, so that whole shards complete one after another."""
    loader = DataLoader(
        _ImageRows(ids, paths, transform, known_bad or {}),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    yield from loader
