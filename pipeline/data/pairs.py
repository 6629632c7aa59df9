"""The usable-pairs rule that training and evaluation share, so that every stage leaves out the same items.

A pair is a caption with its image. It is usable when both have a valid teacher row in the store: a bad image
skipped at extraction takes all its captions out of training and out of the evaluated split alike.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.canonical import CanonicalDataset

__all__ = ["usable_pairs"]


def usable_pairs(ds: CanonicalDataset, split: str, image_valid: np.ndarray, text_valid: np.ndarray) -> np.ndarray:
    """Caption ids of the split whose image and caption both have a valid teacher row."""
    caption_ids = ds.caption_ids(split)
    image_of = ds.caption_image_ids()
    keep = text_valid[caption_ids] & image_valid[image_of[caption_ids]]
    return caption_ids[keep]
