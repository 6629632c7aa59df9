"""Epoch batches: a seeded permutation per epoch cut into global batches, sliced per rank, resumable."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
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


def test_pin_memory_of_every_batch_type_pins_each_tensor_and_keeps_the_rest():
    from stages.distill.data import PairBatch, pinned
    from stages.distill.mcad_data import McadBatch
    from stages.distill.supervised_data import GroundTruthBatch

    def t(*shape):
        return torch.randn(*shape)

    tokens = {"input_ids": t(2, 3), "attention_mask": t(2, 3)}
    batches = [
        PairBatch(t(2), t(2), t(2, 3, 4, 4), tokens, t(2, 5), t(2, 5), ("bad",)),
        McadBatch(t(2), t(2), t(2, 3, 4, 4), tokens, {"a": t(2, 5)}, {"a": t(2, 5)}, t(2, 6), ("bad",)),
        GroundTruthBatch(t(2), t(2), t(2, 3, 4, 4), tokens),
    ]
    for batch in batches:
        seen = []

        def pin(tensor, seen=seen):
            seen.append(tensor)
            return tensor.clone()

        out = pinned(batch, pin)
        assert type(out) is type(batch) and out.bad_rows == batch.bad_rows
        expected = []
        for field in dataclasses.fields(batch):
            value = getattr(batch, field.name)
            values = list(value.values()) if isinstance(value, dict) else [value]
            for original, copied in zip(values, (list(getattr(out, field.name).values()) if isinstance(value, dict)
                                                 else [getattr(out, field.name)]), strict=True):
                if isinstance(original, torch.Tensor):
                    expected.append(original)
                    assert copied is not original and torch.equal(copied, original)
        assert len(seen) == len(expected) and all(a is b for a, b in zip(seen, expected, strict=True))
