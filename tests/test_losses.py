"""Distillation losses against hand-computed values on tiny tensors and against explicit reference loops."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossesConfig
from pipeline.errors import ConfigError, DsmdError
from stages.distill.losses import (
    ContrastiveDistillation,
    DistillationLosses,
    FeatureDistillation,
    HardNegativeDistillation,
    SimilarityDistillation,
    contrastive_distillation,
    hard_negative_triplet,
)


def tensor(rows):
    return torch.tensor(rows, dtype=torch.float32)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Contrastive distillation.


def test_cd_hand_computed():
    s, t = tensor([[1, 0]]), tensor([[1, 0]])
    queue = tensor([[0, 1], [1, 0]])
    ids, queue_ids = torch.tensor([5]), torch.tensor([7, 5])
    # Logits [1, 0, 1] / tau without masking; the entry of image 5 (the positive's own image) is dropped.
    assert contrastive_distillation(s, t, queue, 1.0).item() == pytest.approx(math.log(2 + math.exp(-1)))
    masked = contrastive_distillation(s, t, queue, 1.0, ids, queue_ids).item()
    assert masked == pytest.approx(math.log(1 + math.exp(-1)))
    masked_half = contrastive_distillation(s, t, queue, 0.5, ids, queue_ids).item()
    assert masked_half == pytest.approx(math.log(1 + math.exp(-2)))


def test_cd_with_empty_queue_is_zero():
    s, t = unit(3, 2, 0), unit(3, 2, 1)
    loss = contrastive_distillation(s, t, torch.zeros(0, 2), 0.05)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def _cd_reference(s, t, queue, queue_ids, ids, tau, mask):
    total = 0.0
    for k in range(s.shape[0]):
        logits = [float(s[k] @ t[k]) / tau]
        for j in range(queue.shape[0]):
            if mask and int(queue_ids[j]) == int(ids[k]):
                continue
            logits.append(float(s[k] @ queue[j]) / tau)
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(x - top) for x in logits))
        total += log_sum - logits[0]
    return total / s.shape[0]


@pytest.mark.parametrize("mask", [True, False])
def test_cd_matches_explicit_loop(mask):
    s, t, queue = unit(4, 3, 0), unit(4, 3, 1), unit(6, 3, 2)
    ids = torch.tensor([0, 1, 1, 2])
    queue_ids = torch.tensor([1, 3, 0, 1, 4, 2])
    got = contrastive_distillation(s, t, queue, 0.1, ids if mask else None, queue_ids if mask else None)
    assert got.item() == pytest.approx(_cd_reference(s, t, queue, queue_ids, ids, 0.1, mask), rel=1e-5)


def test_cd_module_uses_only_filled_entries_and_masks_the_positives_image():
    cd = ContrastiveDistillation(dim=3, queue_size=8, tau=0.1, mask_same_image=True)
    s_v, s_t, t_v, t_t = unit(2, 3, 0), unit(2, 3, 1), unit(2, 3, 2), unit(2, 3, 3)
    ids = torch.tensor([4, 9])
    queue_v, queue_t = unit(3, 3, 4), unit(3, 3, 5)
    # The image of sample 0 is already in the queue (entry 1): a copy of its own positive.
    queue_v[1] = t_v[0]
    queue_ids = torch.tensor([1, 4, 2])
    cd.enqueue(queue_v, queue_t, queue_ids)
    out = cd(s_v, s_t, t_v, t_t, ids)
    assert set(out) == {"cd_v", "cd_t", "cd"}
    # Only 3 of the 8 slots are filled; the empty (zero) slots must not act as negatives.
    expected_v = _cd_reference(s_v, t_v, queue_v, queue_ids, ids, 0.1, mask=True)
    expected_t = _cd_reference(s_t, t_t, queue_t, queue_ids, ids, 0.1, mask=True)
    assert out["cd_v"].item() == pytest.approx(expected_v, rel=1e-5)
    assert out["cd_t"].item() == pytest.approx(expected_t, rel=1e-5)
    assert out["cd"].item() == pytest.approx(expected_v + expected_t, rel=1e-5)
    # Sample 1 (image 9) keeps every entry; sample 0 loses exactly its own image's copy.
    only_others = contrastive_distillation(s_v[:1], t_v[:1], queue_v[[0, 2]], 0.1)
    got_0 = contrastive_distillation(s_v[:1], t_v[:1], queue_v, 0.1, ids[:1], queue_ids)
    assert got_0.item() == pytest.approx(only_others.item(), rel=1e-6)


def test_cd_module_without_masking_keeps_same_image_entries():
    cd = ContrastiveDistillation(dim=3, queue_size=4, tau=0.1, mask_same_image=False)
    s, t = unit(2, 3, 0), unit(2, 3, 1)
    queue, ids = unit(2, 3, 2), torch.tensor([0, 1])
    cd.enqueue(queue, queue, ids)
    out = cd(s, s, t, t, ids)
    assert out["cd_v"].item() == pytest.approx(_cd_reference(s, t, queue, ids, ids, 0.1, mask=False), rel=1e-5)


def test_cd_gradient_flows_to_student_only_through_logits():
    cd = ContrastiveDistillation(dim=2, queue_size=4, tau=0.05)
    cd.enqueue(unit(3, 2, 0), unit(3, 2, 1), torch.tensor([0, 1, 2]))
    s = unit(2, 2, 2).requires_grad_()
    out = cd(s, s, unit(2, 2, 3), unit(2, 2, 4), torch.tensor([5, 6]))
    out["cd"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not cd.queues["v"].features.requires_grad


def test_cd_rejects_bad_tau():
    with pytest.raises(ConfigError, match="tau"):
        ContrastiveDistillation(dim=2, tau=0.0)


# ---------------------------------------------------------------------------------------------------------
# Feature and similarity distillation.


def test_fd_hand_computed():
    s_v, t_v = tensor([[1, 0], [0, 1]]), tensor([[0.6, 0.8], [0, 1]])
    s_t = t_t = tensor([[0, 1], [1, 0]])
    out = FeatureDistillation()(s_v, s_t, t_v, t_t)
    # |1 - 0.6| + |0 - 0.8| over 4 elements.
    assert out["fd_v"].item() == pytest.approx(0.3)
    assert out["fd_t"].item() == 0.0
    assert out["fd"].item() == pytest.approx(0.3)


def test_fd_hand_computed_for_both_modalities():
    # Student and teacher differ in both modalities, by amounts whose L1 and L2 (MSE) means differ.
    s_v, t_v = tensor([[0.5, -0.5], [2, 0], [1, 1]]), tensor([[0, 0], [0, 0], [1, 1]])
    s_t, t_t = tensor([[1, 0], [0, 1], [0, 0]]), tensor([[0.5, 0.5], [0, 0.75], [-1, 0]])
    out = FeatureDistillation()(s_v, s_t, t_v, t_t)
    # Image: (0.5 + 0.5 + 2 + 0 + 0 + 0) / 6 elements; text: (0.5 + 0.5 + 0 + 0.25 + 1 + 0) / 6.
    assert out["fd_v"].item() == pytest.approx(3.0 / 6)
    assert out["fd_t"].item() == pytest.approx(2.25 / 6)
    assert out["fd"].item() == pytest.approx(5.25 / 6)


def test_sd_hand_computed_and_scale_free():
    s_v, t_v = tensor([[2, 0], [0, 1]]), tensor([[0.6, 0.8], [0, 1]])
    s_t, t_t = tensor([[1, 0], [1, 0]]), tensor([[0, 1], [-1, 0]])
    out = SimilarityDistillation()(s_v, s_t, t_v, t_t)
    assert out["sd_v"].item() == pytest.approx((0.4 + 0.0) / 2)
    assert out["sd_t"].item() == pytest.approx((1.0 + 2.0) / 2)
    assert out["sd"].item() == pytest.approx(0.2 + 1.5)


def test_feature_shape_mismatch_is_a_clear_error():
    with pytest.raises(DsmdError, match="head dimension"):
        FeatureDistillation()(unit(2, 3, 0), unit(2, 3, 0), unit(2, 4, 0), unit(2, 4, 0))


# ---------------------------------------------------------------------------------------------------------
# Hard negative distillation.

# S = a b^T = [[1, 0, 0], [0, 1, 1], [1, 0, 0]], positives 1, 1, 0 on the diagonal.
A = tensor([[1, 0], [0, 1], [1, 0]])
B = tensor([[1, 0], [0, 1], [0, 1]])
DISTINCT = torch.tensor([0, 1, 2])


@pytest.mark.parametrize(
    ("mode", "margin", "expected"),
    [
        # Rows: hinge 0, 0, 1 -> mean 1/3; columns: 0, 0, 1 -> 1/3.
        ("hardest", 0.0, 2 / 3),
        # Rows: 0, 0.5, 1.5; columns: 0.5, 0, 1.5.
        ("hardest", 0.5, 4 / 3),
        ("hardest_sum", 0.0, 2.0),
        ("hardest_sum", 0.5, 4.0),
        # Every (anchor, negative): rows 1, columns 1.
        ("all_sum", 0.0, 2.0),
        # Rows 0 + 0.5 + (1.5 + 0.5), columns 0.5 + 0 + (0.5 + 1.5).
        ("all_sum", 0.5, 5.0),
    ],
)
def test_hnd_hand_computed(mode, margin, expected):
    got = hard_negative_triplet(A, B, DISTINCT, margin, mode)
    assert got.item() == pytest.approx(expected)


def test_hnd_same_image_items_are_not_negatives():
    # Items 0 and 2 show image 0: rows have no violation left; column 2 still has item 1 as its negative.
    got = hard_negative_triplet(A, B, torch.tensor([0, 1, 0]), 0.0, "hardest")
    assert got.item() == pytest.approx(1 / 3)


def _hnd_reference(a, b, ids, margin, mode):
    scores = (a @ b.t()).tolist()
    n = len(scores)
    total = 0.0
    for direction in range(2):
        terms = []
        for k in range(n):
            hinges = []
            for j in range(n):
                if j == k or int(ids[j]) == int(ids[k]):
                    continue
                negative = scores[k][j] if direction == 0 else scores[j][k]
                hinges.append(max(0.0, margin - scores[k][k] + negative))
            if mode == "all_sum":
                terms.append(sum(hinges))
            else:
                terms.append(max(hinges) if hinges else 0.0)
        total += sum(terms) / n if mode == "hardest" else sum(terms)
    return total


@pytest.mark.parametrize("mode", ["hardest", "hardest_sum", "all_sum"])
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_hnd_matches_explicit_loops(mode, margin):
    a, b = unit(6, 4, 0), unit(6, 4, 1)
    ids = torch.tensor([0, 1, 0, 2, 3, 3])
    got = hard_negative_triplet(a, b, ids, margin, mode)
    assert got.item() == pytest.approx(_hnd_reference(a, b, ids, margin, mode), rel=1e-5, abs=1e-6)


def test_hnd_without_any_negative_is_zero_with_finite_gradient():
    a = unit(2, 3, 0).requires_grad_()
    got = hard_negative_triplet(a, unit(2, 3, 1), torch.tensor([4, 4]), 0.2, "hardest")
    got.backward()
    assert got.item() == 0.0
    assert torch.isfinite(a.grad).all()


def test_hnd_module_sums_the_four_pairs():
    s_v, s_t, t_v, t_t = (unit(5, 3, seed) for seed in range(4))
    ids = torch.tensor([0, 1, 1, 2, 3])
    out = HardNegativeDistillation(margin=0.1, mode="hardest")(s_v, s_t, t_v, t_t, ids)
    pairs = {"vv": (s_v, t_v), "tt": (s_t, t_t), "vt": (s_v, t_t), "tv": (s_t, t_v)}
    for name, (a, b) in pairs.items():
        assert out[f"hnd_{name}"].item() == pytest.approx(_hnd_reference(a, b, ids, 0.1, "hardest"), rel=1e-5)
    assert out["hnd"].item() == pytest.approx(sum(out[f"hnd_{n}"].item() for n in pairs), rel=1e-6)


def test_hnd_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="hnd_mode"):
        HardNegativeDistillation(mode="hardest_mean")


# ---------------------------------------------------------------------------------------------------------
# The container.


def test_container_builds_the_enabled_losses_from_config():
    losses = DistillationLosses(LossesConfig(queue_size=16), dim=3)
    assert losses.names == ["cd", "fd", "sd", "hnd"]
    s_v, s_t, t_v, t_t = (unit(4, 3, seed) for seed in range(4))
    ids = torch.tensor([0, 0, 1, 2])
    values = losses(s_v, s_t, t_v, t_t, ids)
    expected_keys = {"cd", "cd_v", "cd_t", "fd", "fd_v", "fd_t", "sd", "sd_v", "sd_t", "hnd"}
    expected_keys |= {f"hnd_{p}" for p in ("vv", "tt", "vt", "tv")}
    assert set(values) == expected_keys
    assert list(losses.top_level(values)) == ["cd", "fd", "sd", "hnd"]
    losses.enqueue(t_v, t_t, ids)
    assert len(losses.cd.queues["v"]) == 4
    assert "cd.queues.v.features" in losses.state_dict()


def test_container_switches_losses_off():
    cfg = dataclasses.replace(LossesConfig(), cd=False, hnd=False)
    losses = DistillationLosses(cfg, dim=2)
    assert losses.names == ["fd", "sd"]
    values = losses(*(unit(2, 2, seed) for seed in range(4)))
    assert set(values) == {"fd", "fd_v", "fd_t", "sd", "sd_v", "sd_t"}
    losses.enqueue(unit(2, 2, 0), unit(2, 2, 1), torch.tensor([0, 1]))  # no queue: nothing happens
    with pytest.raises(ConfigError, match="enable at least one"):
        DistillationLosses(LossesConfig(cd=False, fd=False, sd=False, hnd=False), dim=2)


def test_container_passes_settings_through():
    cfg = LossesConfig(tau=0.5, queue_size=4, queue_mask_same_image=False, margin=0.3, hnd_mode="all_sum")
    losses = DistillationLosses(cfg, dim=2)
    assert losses.cd.tau == 0.5 and not losses.cd.mask_same_image and losses.cd.queues["t"].size == 4
    assert losses.hnd.margin == 0.3 and losses.hnd.mode == "all_sum"
    values = losses(A, A, B, B, DISTINCT)
    assert values["hnd_vv"].item() == pytest.approx(_hnd_reference(A, B, DISTINCT, 0.3, "all_sum"))


def test_losses_stay_float32_under_autocast():
    losses = DistillationLosses(LossesConfig(queue_size=8), dim=3)
    features = [unit(4, 3, seed) for seed in range(4)]
    ids = torch.tensor([0, 1, 2, 3])
    losses.enqueue(unit(4, 3, 9), unit(4, 3, 8), torch.tensor([5, 6, 7, 8]))
    reference = losses(*features, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = losses(*features, ids)
    for name, value in reference.items():
        assert mixed[name].dtype == torch.float32
        assert mixed[name].item() == pytest.approx(value.item(), rel=1e-5), name
