"""Epoch batches: a seeded permutation per epoch cut into global batches, sliced per rank, resumable."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.distill.data import EpochBatches


def batches(n, size, **kw) -> list[list[int]]:
    return list(EpochBatches(n, size, **kw))


@given(
    n=st.integers(1, 200),
    size=st.integers(1, 40),
    seed=st.integers(0, 5),
    epoch=st.integers(0, 3),
    group=st.integers(1, 3),
)
@settings(max_examples=60, deadline=None)
def test_an_epoch_is_whole_distinct_batches_of_a_permutation(n, size, seed, epoch, group):
    out = batches(n, size, seed=seed, epoch=epoch, group=group)
    flat = [i for b in out for i in b]
    assert all(len(b) == size for b in out)
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))
    # Only the incomplete tail is dropped, and whole groups of batches are kept.
    assert len(out) == n // size // group * group
    assert len(out) == len(EpochBatches(n, size, seed=seed, epoch=epoch, group=group))


def test_seed_and_epoch_decide_the_order():
    assert batches(100, 10, seed=0, epoch=0) == batches(100, 10, seed=0, epoch=0)
    assert batches(100, 10, seed=0, epoch=0) != batches(100, 10, seed=0, epoch=1)
    assert batches(100, 10, seed=0, epoch=0) != batches(100, 10, seed=1, epoch=0)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_see_the_single_process_batches(world):
    single = batches(103, 12, seed=3, epoch=2)
    per_rank = [batches(103, 12, seed=3, epoch=2, rank=r, world=world) for r in range(world)]
    assert all(len(b) == len(single) for b in per_rank)
    for step, whole in enumerate(single):
        assert [i for r in range(world) for i in per_rank[r][step]] == whole


def test_start_batch_continues_where_a_checkpoint_stopped():
    full = batches(90, 10, seed=1, epoch=4)
    assert batches(90, 10, seed=1, epoch=4, start_batch=3) == full[3:]
    assert len(EpochBatches(90, 10, seed=1, epoch=4, start_batch=3)) == len(full) - 3
    assert batches(90, 10, seed=1, epoch=4, start_batch=len(full)) == []


def test_batch_size_must_split_over_ranks():
    with pytest.raises(ValueError, match="not divisible"):
        EpochBatches(10, 5, seed=0, epoch=0, world=2)


def test_batches_are_plain_int_lists():
    (first, *_) = batches(20, 5, seed=0, epoch=0)
    assert all(isinstance(i, int) for i in first)
    assert np.asarray(first).dtype.kind == "i"
