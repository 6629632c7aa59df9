"""The no-teacher baseline's objective (CLIP's symmetric InfoNCE) against values computed by hand."""

import math

import pytest
import torch

from pipeline.errors import DsmdError
from stages.distill.supervised import MAX_LOGIT_SCALE, SupervisedContrastive, symmetric_infonce

S_V = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
S_T = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # logits at scale 1: [[1, 0.6], [0, 0.8]]


def nll(positive: float, *others: float) -> float:
    return -positive + math.log(sum(math.exp(x) for x in (positive, *others)))


def test_both_directions_by_hand():
    values = symmetric_infonce(S_V, S_T, torch.tensor(0.0))
    i2t = (nll(1.0, 0.6) + nll(0.8, 0.0)) / 2  # rows: image k against every caption
    t2i = (nll(1.0, 0.0) + nll(0.8, 0.6)) / 2  # columns: caption k against every image
    assert values["i2t"].item() == pytest.approx(i2t, rel=1e-6)
    assert values["t2i"].item() == pytest.approx(t2i, rel=1e-6)
    assert values["infonce"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert i2t != pytest.approx(t2i)  # the example tells the two directions apart


def test_the_scale_multiplies_the_logits():
    values = symmetric_infonce(S_V, S_T, torch.tensor(math.log(3.0)))
    assert values["i2t"].item() == pytest.approx((nll(3.0, 1.8) + nll(2.4, 0.0)) / 2, rel=1e-6)


def test_captions_of_the_same_image_are_not_negatives():
    s_v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s_t = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    # logits (scale 1): [[1, .8, .6], [1, .8, .6], [0, .6, .8]]; pairs 0 and 1 show image 5.
    values = symmetric_infonce(s_v, s_t, torch.tensor(0.0), torch.tensor([5, 5, 7]))
    i2t = (nll(1.0, 0.6) + nll(0.8, 0.6) + nll(0.8, 0.0, 0.6)) / 3
    t2i = (nll(1.0, 0.0) + nll(0.8, 0.6) + nll(0.8, 0.6, 0.6)) / 3
    assert values["i2t"].item() == pytest.approx(i2t, rel=1e-6)
    assert values["t2i"].item() == pytest.approx(t2i, rel=1e-6)
    unmasked = symmetric_infonce(s_v, s_t, torch.tensor(0.0))
    assert unmasked["i2t"].item() > values["i2t"].item()


def test_temperature_is_learnable_and_clamped_at_100():
    objective = SupervisedContrastive()
    assert objective.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    objective(S_V, S_T)["infonce"].backward()
    assert objective.logit_scale.grad is not None and objective.logit_scale.grad.item() != 0

    clamped = SupervisedContrastive(init_logit_scale=10.0)
    values = clamped(S_V, S_T)
    at_limit = symmetric_infonce(S_V, S_T, torch.tensor(MAX_LOGIT_SCALE))
    assert values["infonce"].item() == pytest.approx(at_limit["infonce"].item(), rel=1e-6)
    assert values["temperature"].item() == pytest.approx(0.01)
    values["infonce"].backward()
    assert clamped.logit_scale.grad.item() == 0  # past the clamp the scale stops learning
    assert list(clamped.top_level(values)) == ["infonce"] == clamped.names


def test_mismatched_shapes_are_named():
    with pytest.raises(DsmdError, match=r"one shape \(B, D\)"):
        symmetric_infonce(S_V, S_T[:1], torch.tensor(0.0))
    with pytest.raises(DsmdError, match=r"image_ids must have shape \(2,\)"):
        symmetric_infonce(S_V, S_T, torch.tensor(0.0), torch.tensor([1, 2, 3]))
