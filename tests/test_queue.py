"""The teacher-feature queue: FIFO order, wrap-around, only filled entries, state round trip, DDP gather."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import DsmdError
from stages.distill.queue import FeatureQueue, gather_for_queue


def _batch(start: int, n: int, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose features encode their id, so order can be read back from either."""
    ids = torch.arange(start, start + n)
    return ids.float().view(-1, 1).repeat(1, dim), ids


def test_fills_from_the_start_and_reports_only_filled_entries():
    queue = FeatureQueue(size=5, dim=2)
    assert len(queue) == 0
    assert queue.valid()[0].shape == (0, 2)
    queue.enqueue(*_batch(10, 2))
    features, ids = queue.valid()
    assert ids.tolist() == [10, 11]
    assert features[:, 0].tolist() == [10.0, 11.0]
    assert len(queue) == 2


def test_wraps_around_when_k_is_not_a_multiple_of_b():
    queue = FeatureQueue(size=5, dim=2)
    for start in (0, 2, 4, 6):  # 8 rows into 5 slots
        queue.enqueue(*_batch(start, 2))
    features, ids = queue.ordered()
    assert ids.tolist() == [3, 4, 5, 6, 7]
    assert features[:, 1].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert int(queue.ptr) == 3 and len(queue) == 5
    # Storage order: position 0..2 were overwritten by 5, 6, 7.
    assert queue.valid()[1].tolist() == [5, 6, 7, 3, 4]


def test_batch_larger_than_queue_keeps_the_newest():
    queue = FeatureQueue(size=3, dim=2)
    queue.enqueue(*_batch(0, 2))
    queue.enqueue(*_batch(100, 7))
    assert queue.ordered()[1].tolist() == [104, 105, 106]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 9), batches=st.lists(st.integers(0, 12), max_size=8))
def test_matches_a_bounded_deque(size, batches):
    queue = FeatureQueue(size=size, dim=2)
    reference: collections.deque = collections.deque(maxlen=size)
    start = 0
    for n in batches:
        queue.enqueue(*_batch(start, n))
        reference.extend(range(start, start + n))
        start += n
    features, ids = queue.ordered()
    assert ids.tolist() == list(reference)
    assert features[:, 0].tolist() == [float(i) for i in reference]
    assert sorted(queue.valid()[1].tolist()) == sorted(reference)


def test_state_round_trip_resumes_identically():
    queue = FeatureQueue(size=4, dim=2)
    queue.enqueue(*_batch(0, 3))
    queue.enqueue(*_batch(3, 2))
    restored = FeatureQueue(size=4, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert set(queue.state_dict()) == {"features", "ids", "ptr", "filled"}
    for q in (queue, restored):
        q.enqueue(*_batch(5, 3))
    assert torch.equal(queue.ordered()[0], restored.ordered()[0])
    assert queue.ordered()[1].tolist() == restored.ordered()[1].tolist() == [4, 5, 6, 7]


def test_checkpoint_of_another_size_is_refused_with_the_setting_named():
    saved = FeatureQueue(size=4, dim=2).state_dict()
    with pytest.raises(DsmdError, match="queue_size"):
        FeatureQueue(size=8, dim=2).load_state_dict(saved)
    # Also as a submodule (the path checkpoints take).
    parent = torch.nn.ModuleDict({"v": FeatureQueue(size=8, dim=2)})
    with pytest.raises(DsmdError, match="queue_size"):
        parent.load_state_dict({f"v.{k}": v for k, v in saved.items()})


def test_bad_shapes_are_refused():
    queue = FeatureQueue(size=4, dim=3)
    with pytest.raises(DsmdError, match=r"\(B, 3\)"):
        queue.enqueue(torch.zeros(2, 2), torch.arange(2))
    with pytest.raises(DsmdError, match="one image id"):
        queue.enqueue(torch.zeros(2, 3), torch.arange(3))
    with pytest.raises(DsmdError):
        FeatureQueue(size=0, dim=3)


def test_gather_is_identity_without_ddp():
    x = torch.randn(3, 2)
    assert gather_for_queue(x) is x


def _gather_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Unequal batch sizes (a last, partial batch on rank 1).
        n = 3 if rank == 0 else 2
        ids = torch.arange(n) + 10 * rank
        features = ids.float().view(-1, 1).repeat(1, 2)
        results[rank] = (gather_for_queue(features).tolist(), gather_for_queue(ids).tolist())
    finally:
        dist.destroy_process_group()


def test_gather_concatenates_ranks_in_order_with_unequal_sizes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    expected_ids = [0, 1, 2, 10, 11]
    for rank in (0, 1):
        features, ids = results[rank]
        assert ids == expected_ids
        assert [row[0] for row in features] == [float(i) for i in expected_ids]
