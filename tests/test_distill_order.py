"""distill.order: "shuffle" is the full permutation of before; "blocks" visits blocks of image ids whole, a
window of them at a time, still covering every pair once per epoch."""

from __future__ import annotations

import distill_helpers
import numpy as np
import pytest
import torch
from distill_helpers import load, write_params
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.distill.data import EpochBatches
from stages.distill.order import epoch_order, image_blocks

world = distill_helpers.world


def _order(n, blocks=None, window=1, seed=0):
    return epoch_order(n, torch.Generator().manual_seed(seed), blocks, window).tolist()


def _most_blocks_open_at_once(order: list[int], blocks: np.ndarray) -> int:
    """The largest number of blocks whose first-to-last span covers one position: the blocks a reader must
    hold at once when it keeps a block from its first item to its last."""
    labels = blocks[np.asarray(order)]
    first = {b: int(np.flatnonzero(labels == b)[0]) for b in np.unique(labels)}
    last = {b: int(np.flatnonzero(labels == b)[-1]) for b in np.unique(labels)}
    return max(sum(first[b] <= p <= last[b] for b in first) for p in range(len(order)))


def test_shuffle_is_the_permutation_of_before():
    # The default keeps every existing run bit for bit: the same generator call as before the setting existed.
    assert _order(50, seed=7) == torch.randperm(50, generator=torch.Generator().manual_seed(7)).tolist()


@given(
    image_of=st.lists(st.integers(0, 59), min_size=1, max_size=150),
    block_rows=st.integers(1, 20),
    window=st.integers(1, 5),
    seed=st.integers(0, 3),
)
@settings(max_examples=80, deadline=None)
def test_blocks_cover_every_item_once_and_hold_at_most_a_window_open(image_of, block_rows, window, seed):
    blocks = image_blocks(np.array(image_of), block_rows)
    order = _order(len(image_of), blocks, window, seed)
    assert sorted(order) == list(range(len(image_of)))
    assert _most_blocks_open_at_once(order, blocks) <= window


def test_a_full_shuffle_holds_nearly_every_block_open():
    # The contrast that makes the property above mean something.
    blocks = image_blocks(np.arange(400) // 5, 2)  # 400 pairs, 5 per image, 2 images a block: 40 blocks
    assert _most_blocks_open_at_once(_order(400), blocks) > 30
    assert _most_blocks_open_at_once(_order(400, blocks, window=4), blocks) <= 4


def test_blocks_still_mix_within_a_window_and_vary_by_seed_and_epoch():
    blocks = image_blocks(np.arange(300) // 3, 20)  # 5 blocks of 60 pairs
    whole = _order(300, blocks, window=5)
    assert sorted(whole) == list(range(300)) and whole != sorted(whole)
    # One window of all blocks: the first 60 items come from several blocks, not from one.
    assert len(set(blocks[whole[:60]])) > 1
    assert _order(300, blocks, 2, seed=0) != _order(300, blocks, 2, seed=1)
    first, second = (list(EpochBatches(300, 30, seed=0, epoch=e, blocks=blocks, window=2)) for e in (0, 1))
    assert first != second


def test_block_batches_split_over_ranks_and_resume_like_shuffled_ones():
    blocks = image_blocks(np.arange(120) // 2, 8)
    single = list(EpochBatches(120, 12, seed=3, epoch=1, blocks=blocks, window=2))
    ranks = [list(EpochBatches(120, 12, seed=3, epoch=1, rank=r, world=2, blocks=blocks, window=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == single
    assert list(EpochBatches(120, 12, seed=3, epoch=1, start_batch=4, blocks=blocks, window=2)) == single[4:]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="block_rows"):
        image_blocks(np.arange(3), 0)
    with pytest.raises(ValueError, match="3 block labels for 4 items"):
        _order(4, np.zeros(3, dtype=np.int64))


def test_a_blocks_run_reads_its_store_shards_window_by_window(world, tmp_path, capsys):
    from pipeline.data.canonical import CanonicalDataset
    from stages.distill.resume import config_digest
    from stages.distill.train import Trainer

    changes = {"distill": {"order": "blocks", "order_block_rows": 16, "order_window": 1, "epochs": 1}}
    trainer = Trainer(load(write_params(world, tmp_path, changes)))
    data = trainer.data
    assert "order: blocks of 16 image ids, 1 of 4 at a time" in capsys.readouterr().err
    image_of = CanonicalDataset.load(world.canonical).caption_image_ids()
    for batch in EpochBatches(len(data.train_pairs), 20, seed=0, epoch=0, blocks=data.blocks, window=1):
        # A window of one block: a batch spans at most the two blocks on either side of a window's edge.
        assert len(set(image_of[data.train_pairs[batch]] // 16)) <= 2
    summary = trainer.train()
    assert summary["steps"] == len(data.train_pairs) // 20 and np.isfinite(summary["best_val_rsum"])

    # The order is part of what a checkpoint must agree on; at its default it is left out of the digest, so a
    # checkpoint from before the setting existed still resumes.
    cfg = load(write_params(world, tmp_path / "shuffle"))
    fingerprint = CanonicalDataset.load(world.canonical).fingerprint
    assert config_digest(load(write_params(world, tmp_path / "b", changes)), fingerprint) != config_digest(
        cfg, fingerprint)


def test_the_window_hook_sees_each_window_as_its_batches_start_and_changes_no_batch():
    blocks = np.repeat(np.arange(10), 12)  # 120 items in 10 blocks, windows of 3 blocks: 36, 36, 36, 12 items
    seen = []
    plain = list(EpochBatches(120, 10, seed=2, epoch=1, blocks=blocks, window=3))
    hooked = EpochBatches(120, 10, seed=2, epoch=1, blocks=blocks, window=3,
                          on_window=lambda windows, current: seen.append((current, windows)))
    calls_before = []
    for batch in hooked:
        calls_before.append(len(seen))
        assert batch == plain[len(calls_before) - 1]
    assert len(calls_before) == len(plain)
    # Window w is announced before the batch holding its first items (batch 3 holds items 30..39: window 1).
    assert [current for current, _ in seen] == [0, 1, 2, 3]
    assert calls_before == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4]  # items 108.. are window 3
    windows = seen[0][1]
    assert [len(w) for w in windows] == [36, 36, 36, 12]
    assert np.concatenate(windows).tolist() == [i for batch in plain for i in batch]
    # Resumed mid-epoch: the window reached is announced first.
    seen.clear()
    list(EpochBatches(120, 10, seed=2, epoch=1, blocks=blocks, window=3, start_batch=5,
                      on_window=lambda windows, current: seen.append((current, windows))))
    assert [current for current, _ in seen] == [1, 2, 3]
