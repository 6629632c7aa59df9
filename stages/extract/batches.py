"""Image batches for the teacher: decoding in loader workers, bad images turned into recorded skips."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.images import load_or_skip
from pipeline.data.views import crop_view, draw_boxes


@dataclass
class ImageBatch:
    ids: torch.Tensor  # int64 image ids
    pixels: torch.Tensor  # only the rows that decoded, in order
    ok: torch.Tensor  # bool per id: decoded and present in pixels
    reasons: list[str]  # "" for good rows
    # With views: pixels holds K crops per decoded row (row-major), boxes (rows decoded, K, 4) their boxes.
    boxes: torch.Tensor | None = None


class ViewCrops:
    """Decoded image -> its K views for the teacher: boxes drawn from (seed, image id, view), each crop through
    the teacher's transform. Picklable, for loader workers."""

    def __init__(self, transform, views: int, seed: int, min_scale: float):
        self.transform, self.views, self.seed, self.min_scale = transform, views, seed, min_scale

    def __call__(self, image, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = draw_boxes(self.seed, image_id, self.views, image.width, image.height, self.min_scale)
        pixels = torch.stack([self.transform(crop_view(image, box)) for box in boxes])
        return pixels, torch.from_numpy(boxes)


class _ImageRows(Dataset):
    def __init__(
        self,
        ids: Sequence[int],
        paths: Callable[[int], Path],
        transform,
        known_bad: dict[int, str],
        views: ViewCrops | None = None,
    ):
        self.ids = list(ids)
        self.paths = paths
        self.transform = transform
        self.known_bad = known_bad
        self.views = views

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        # The reasons are worded as `dsmd data check` words them, so a store is the same with or without a check.
        image, reason = load_or_skip(self.paths, image_id, self.known_bad)
        if image is None:
            return image_id, None, reason
        if self.views is not None:
            return image_id, self.views(image, image_id), ""
        return image_id, self.transform(image), ""


def _collate(items) -> ImageBatch:
    ids = torch.tensor([item[0] for item in items], dtype=torch.int64)
    good = [item[1] for item in items if item[1] is not None]
    ok = torch.tensor([item[1] is not None for item in items], dtype=torch.bool)
    reasons = [item[2] for item in items]
    if good and isinstance(good[0], tuple):  # views: (K crops, K boxes) per image
        pixels = torch.cat([crops for crops, _ in good])
        return ImageBatch(ids=ids, pixels=pixels, ok=ok, reasons=reasons, boxes=torch.stack([b for _, b in good]))
    pixels = torch.stack(good) if good else torch.empty(0)
    return ImageBatch(ids=ids, pixels=pixels, ok=ok, reasons=reasons)


def image_batches(
    batches: Sequence[Sequence[int]],
    paths: Callable[[int], Path],
    transform,
    *,
    workers: int,
    known_bad: dict[int, str] | None = None,
    pin_memory: bool = False,
    views: ViewCrops | None = None,
) -> Iterator[ImageBatch]:
    """One ImageBatch per list of image ids in `batches`, in that order (the caller keeps batches inside one
    shard, so a shard's contents never depend on where a run started). With `views`, each image's K crops."""
    ids = [image_id for batch in batches for image_id in batch]
    positions, start = [], 0
    for batch in batches:
        positions.append(list(range(start, start + len(batch))))
        start += len(batch)
    loader = DataLoader(
        _ImageRows(ids, paths, transform, known_bad or {}, views),
        batch_sampler=positions,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    yield from loader
