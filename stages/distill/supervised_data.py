"""Batches for the no-teacher baseline (distill.method=supervised): images and tokenised captions of the
ground-truth pairs, nothing from the feature store.

Which pairs: every caption of the split whose image `dsmd data check` did not list as bad, the list extraction
skips too; an image that fails to decode later drops its pair from the batch, as for the other methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.canonical import CanonicalDataset
from pipeline.data.check import load_bad_images
from stages.distill.data import decoded_items, pinned

__all__ = ["GroundTruthBatch", "GroundTruthCollate", "pair_validity"]


@dataclass
class GroundTruthBatch:
    image_ids: torch.Tensor
    caption_ids: torch.Tensor
    pixels: torch.Tensor
    tokens: dict[str, torch.Tensor]
    bad_rows: tuple[str, ...] = ()  # no teacher rows, so never any (the trainer's guard reads it)

    def pin_memory(self) -> GroundTruthBatch:
        # DataLoader(pin_memory=True) calls this on custom batch types (as on PairBatch).
        return pinned(self)


class GroundTruthCollate:
    """Tokenise the captions and stack the images; runs in the loader workers. Items are PairRows items."""

    def __init__(self, tokenize: Callable[[list[str]], dict]):
        self.tokenize = tokenize

    def __call__(self, items) -> GroundTruthBatch:
        rerun = "`dsmd distill` again (it skips the bad images the check lists)"
        items, caption_ids, image_ids = decoded_items(items, rerun)
        return GroundTruthBatch(
            image_ids=torch.from_numpy(image_ids),
            caption_ids=torch.from_numpy(caption_ids),
            pixels=torch.stack([item[2] for item in items]),
            tokens=self.tokenize([item[3] for item in items]),
        )


def pair_validity(ds: CanonicalDataset) -> tuple[np.ndarray, np.ndarray]:
    """(image valid, caption valid) masks in the store's row spaces, from the dataset alone: every caption, and
    every image but those the last `dsmd data check` found bad."""
    image_valid = np.ones(ds.num_images, dtype=bool)
    bad = list(load_bad_images(ds.directory))
    image_valid[bad] = False
    return image_valid, np.ones(ds.num_captions, dtype=bool)
