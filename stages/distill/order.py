"""The order in which an epoch visits the training pairs (distill.order).

``shuffle``: one seeded permutation of all pairs. Every batch reads teacher rows and images from anywhere in the
store and the dataset: the best mixing, and free while the store sits in the page cache or in the S3 shard cache.

``blocks``: the pairs are grouped by block, a run of ``block_rows`` consecutive image ids (by default one store
shard of image rows; their captions' text rows follow them in the caption shards, and with WebDataset input the
images of a block are consecutive members of one or two tars). The epoch visits the blocks in a seeded random
order, ``window`` blocks at a time, and permutes the pairs of each window among themselves. So a stretch of the
epoch reads only its window's shards, each of them whole and once per epoch, which a bounded shard cache holds:
WebDataset's shard shuffle plus a shuffle buffer, where the buffer is the window. A batch then mixes images of at
most ``window`` blocks (two where it straddles windows): the bigger the window, the closer to a full shuffle.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["epoch_order", "epoch_windows", "image_blocks"]


def image_blocks(image_ids: np.ndarray, block_rows: int) -> np.ndarray:
    """The block of each item, from its image id."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    return np.asarray(image_ids, dtype=np.int64) // block_rows


def epoch_order(
    n_items: int, generator: torch.Generator, blocks: np.ndarray | None = None, window: int = 1
) -> torch.Tensor:
    """Item indices of one epoch, each exactly once: a full permutation, or block by block (see module doc)."""
    return epoch_windows(n_items, generator, blocks, window)[0]


def epoch_windows(
    n_items: int, generator: torch.Generator, blocks: np.ndarray | None = None, window: int = 1
) -> tuple[torch.Tensor, np.ndarray | None]:
    """epoch_order, and where its windows start in it (with a last entry n_items; None for the full shuffle):
    window w is order[starts[w]:starts[w + 1]]."""
    if blocks is None:
        return torch.randperm(n_items, generator=generator), None
    blocks = np.asarray(blocks)
    if len(blocks) != n_items:
        raise ValueError(f"{len(blocks)} block labels for {n_items} items")
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    labels, block_of = np.unique(blocks, return_inverse=True)
    # Items grouped by block: block b's items are by_block[starts[b]:starts[b + 1]].
    by_block = np.argsort(block_of, kind="stable")
    starts = np.searchsorted(block_of[by_block], np.arange(len(labels) + 1))
    visit = torch.randperm(len(labels), generator=generator).numpy()
    parts = []
    for first in range(0, len(visit), window):
        members = np.concatenate([by_block[starts[b] : starts[b + 1]] for b in visit[first : first + window]])
        parts.append(members[torch.randperm(len(members), generator=generator).numpy()])
    bounds = np.cumsum([0, *(len(part) for part in parts)])
    order = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.int64)
    return order, bounds
