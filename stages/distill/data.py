"""Training pairs: raw images and captions from the canonical dataset, teacher rows fetched by id from the store.

Every caption of the split is one pair (its image, itself). Pairs whose image or caption has no valid teacher
row (a bad image skipped at extraction) are left out up front (pipeline.data.pairs.usable_pairs), so every
stage skips the same items.

The order is a seeded permutation per epoch (or block by block: stages.distill.order), cut into global
batches; rank r of W takes its slice of each global batch. So a run on W ranks sees exactly the global batches
of a single-process run with the same batch size, and a resumed run starts at the batch where the checkpoint
stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.data.canonical import CanonicalDataset
from pipeline.data.images import BadImageError, load_rgb
from pipeline.data.views import crop_view
from pipeline.errors import DsmdError
from stages.distill.guard import bad_teacher_rows, describe_rows
from stages.distill.order import epoch_windows
from stages.distill.views import ViewPlan, teacher_image_rows


def pinned(batch, pin: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.pin_memory):
    """A copy of a batch dataclass with every tensor, also inside dict fields, passed through ``pin``: the
    pin_memory of every batch type the loaders yield."""
    def each(value):
        if isinstance(value, torch.Tensor):
            return pin(value)
        if isinstance(value, dict):
            return {k: each(v) for k, v in value.items()}
        return value

    return replace(batch, **{f.name: each(getattr(batch, f.name)) for f in fields(batch)})


@dataclass
class PairBatch:
    image_ids: torch.Tensor
    caption_ids: torch.Tensor
    pixels: torch.Tensor
    tokens: dict[str, torch.Tensor]
    teacher_image: torch.Tensor
    teacher_text: torch.Tensor
    bad_rows: tuple[str, ...] = ()  # teacher rows that are not finite or not unit norm (stages.distill.guard)
    # The stored view each image was cropped to (distill.views replay / mismatch), -1 for the plain image.
    views: torch.Tensor | None = None

    def pin_memory(self) -> PairBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types; without it the batch stays pageable
        # and every host-to-GPU copy is synchronous.
        return pinned(self)


class PairRows(Dataset):
    """Item k: (caption id, image id, image tensor, caption text, stored view or -1).

    With ``views`` (a ViewPlan) the image is first cropped to the epoch's stored view of it, exactly the box the
    teacher saw, then passed through the student's transform."""

    def __init__(
        self, ds: CanonicalDataset, caption_ids: np.ndarray, image_transform: Callable, views: ViewPlan | None = None
    ):
        self.ds = ds
        self.caption_ids = np.asarray(caption_ids, dtype=np.int64)
        self.image_of = ds.caption_image_ids()
        self.texts = ds.captions.column("text").to_pylist()
        self.transform = image_transform
        self.views = views

    def __len__(self) -> int:
        return len(self.caption_ids)

    def __getitem__(self, index: int):
        caption_id = int(self.caption_ids[index])
        image_id = int(self.image_of[caption_id])
        view = -1 if self.views is None else self.views.view(image_id)
        try:
            image = load_rgb(self.ds.image_source(image_id))
            if view >= 0:
                image = crop_view(image, self.views.boxes[image_id, view])
        except (BadImageError, ValueError):
            # The file changed after extraction (so that the box no longer fits, too); the collate function drops
            # the pair.
            return caption_id, image_id, None, self.texts[caption_id], view
        return caption_id, image_id, self.transform(image), self.texts[caption_id], view


def decoded_items(items: list, rerun: str) -> tuple[list, np.ndarray, np.ndarray]:
    """The (caption id, image id, pixels, text) items whose image decoded, with their caption and image ids.

    ``rerun`` names the extraction commands to suggest when no image of the batch decodes at all.
    """
    items = [item for item in items if item[2] is not None]
    if not items:
        raise DsmdError(
            "every image of a training batch failed to decode; the images changed after extraction: run "
            f"`dsmd data check`, then {rerun}"
        )
    caption_ids = np.array([item[0] for item in items], dtype=np.int64)
    image_ids = np.array([item[1] for item in items], dtype=np.int64)
    return items, caption_ids, image_ids


class PairCollate:
    """Tokenise the captions and fetch the batch's teacher rows; runs inside the loader workers."""

    def __init__(
        self, tokenize: Callable[[list[str]], dict], open_reader: Callable, teacher: str, views: str = "plain"
    ):
        self.tokenize = tokenize
        self.open_reader = open_reader
        self.teacher = teacher
        self.views = views  # distill.views: "replay" takes the image rows of the items' stored views
        self._reader = None

    def __call__(self, items) -> PairBatch:
        if self._reader is None:  # opened once per worker process, never pickled
            self._reader = self.open_reader()
        items, caption_ids, image_ids = decoded_items(items, "`dsmd extract`")
        views = item_views(items)
        teacher_image, image_array = teacher_image_rows(self._reader, self.teacher, image_ids, views, self.views)
        teacher_text = self._reader.get(self.teacher, "text", caption_ids)
        bad = describe_rows({
            image_array: bad_teacher_rows(teacher_image, image_ids),
            f"{self.teacher}/text": bad_teacher_rows(teacher_text, caption_ids),
        })
        return PairBatch(
            image_ids=torch.from_numpy(image_ids),
            caption_ids=torch.from_numpy(caption_ids),
            pixels=torch.stack([item[2] for item in items]),
            tokens=self.tokenize([item[3] for item in items]),
            teacher_image=torch.from_numpy(teacher_image),
            teacher_text=torch.from_numpy(teacher_text),
            bad_rows=bad,
            views=None if views is None else torch.from_numpy(views),
        )


def item_views(items: list) -> np.ndarray | None:
    """The stored view of each item (PairRows' fifth field), or None when the items carry none."""
    if not items or len(items[0]) < 5 or items[0][4] < 0:
        return None
    return np.array([item[4] for item in items], dtype=np.int64)


class EpochBatches(Sampler[list[int]]):
    """Index batches of one epoch for one rank: seeded permutation, whole global batches only.

    ``group``: the number of batches per epoch is rounded down to a multiple of it, so that with gradient
    accumulation over ``group`` micro-batches no epoch ends in the middle of an optimiser step.
    ``blocks`` and ``window``: the item order goes block by block (stages.distill.order, distill.order blocks);
    without blocks it is a full permutation. ``on_window``: with blocks, called as the epoch's batches reach
    each window (the first one reached too, also mid-epoch on resume) with the windows' item indices and the
    window's number, before its first batch is yielded (WindowPrefetch); it never changes the batches.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        start_batch: int = 0,
        group: int = 1,
        blocks: np.ndarray | None = None,
        window: int = 1,
        on_window: Callable[[list[np.ndarray], int], None] | None = None,
    ):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} ranks")
        self.n_items, self.batch_size = n_items, batch_size
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.start_batch, self.group = start_batch, group
        self.blocks, self.window, self.on_window = blocks, window, on_window

    @staticmethod
    def batches_per_epoch(n_items: int, batch_size: int, group: int = 1) -> int:
        # Incomplete last batches are dropped: every rank steps the same number of times and the hardest
        # negative always has company.
        return n_items // batch_size // group * group

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.n_items, self.batch_size, self.group) - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order, bounds = epoch_windows(self.n_items, generator, self.blocks, self.window)
        windows = None
        if bounds is not None and self.on_window is not None:
            items = order.numpy()
            windows = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        per_rank = self.batch_size // self.world
        reached = -1
        for batch in range(self.start_batch, self.batches_per_epoch(self.n_items, self.batch_size, self.group)):
            if windows is not None:
                # The window of the global batch's last item: a batch straddling two windows starts the second.
                last = (batch + 1) * self.batch_size - 1
                current = int(np.searchsorted(bounds, last, side="right")) - 1
                if current != reached:
                    reached = current
                    self.on_window(windows, current)
            start = batch * self.batch_size + self.rank * per_rank
            yield order[start : start + per_rank].tolist()


class WindowPrefetch:
    """EpochBatches' on_window for a store on S3 (distill.order blocks): as the batches reach window w, start
    downloading the store shards of windows w and w + 1 in the background, so that a step waits for no shard
    download that could be foreseen. With ``behind`` = 1 (loader workers, which run some batches ahead of the
    step) the shards of window w - 1 are held: batches already handed to the workers may still read them. The
    prefetch takes only what the shard cache holds next to the held ones (StoreReader.prefetch).

    ``rows(caption_ids)``: the (teacher, kind, row ids) a batch of these training pairs reads (the method's
    prefetch_rows). Runs where the sampler runs, in the main process; loader workers share the cache directory,
    so they find the files there, and wait for one still downloading rather than fetch it again."""

    def __init__(self, reader, train_pairs: np.ndarray, rows: Callable[[np.ndarray], list], behind: int = 0):
        self.reader, self.train_pairs, self.rows, self.behind = reader, train_pairs, rows, behind

    def __call__(self, windows: list[np.ndarray], current: int) -> None:
        def rows_of(numbers: range) -> list:
            present = [w for w in numbers if 0 <= w < len(windows)]
            return [entry for w in present for entry in self.rows(self.train_pairs[windows[w]])]

        self.reader.prefetch(rows_of(range(current, current + 2)), held=rows_of(range(current - self.behind, current)))
