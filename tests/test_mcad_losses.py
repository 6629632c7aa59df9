"""MCAD losses (stages/distill/mcad.py): hand-computed values on tiny tensors, a plain-loop reference for the
mixed distributions, zero KL on agreement, and gradients only into the student."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import BalancerConfig, LossesConfig, McadConfig
from pipeline.errors import ConfigError, DsmdError
from stages.distill.balancer import DynamicBalancer
from stages.distill.losses import DistillationLosses, FeatureDistillation
from stages.distill.mcad import (
    DistributionDistillation,
    McadLosses,
    McadObjective,
    McadRows,
    ModifiedFeatureDistillation,
    align_fused,
    kl_divergence,
    mix_log_distributions,
    modified_features,
    similarity_log_distributions,
)


def unit(rows, seed=None) -> torch.Tensor:
    if seed is not None:
        rows = torch.randn(*rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return F.normalize(torch.as_tensor(rows, dtype=torch.float32), dim=-1)


def test_aligned_and_modified_features_by_hand():
    fused = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    weight = torch.tensor([[0.0, 2.0], [5.0, 5.0], [3.0, 0.0]])
    aligned = align_fused(fused, weight)
    torch.testing.assert_close(aligned, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))

    t_v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t_t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    mv, mt = modified_features(t_v, t_t, aligned, beta=1.0)
    r = 1 / math.sqrt(2)
    # row 0: [1,0] + [0,1] -> [r, r]; [0,1] + [0,1] -> [0, 1].  row 1: [0,1] + [1,0] -> [r, r] twice.
    torch.testing.assert_close(mv, torch.tensor([[r, r], [r, r]]))
    torch.testing.assert_close(mt, torch.tensor([[0.0, 1.0], [r, r]]))
    # beta = 0 leaves the teacher as it is
    mv0, mt0 = modified_features(t_v, t_t, aligned, beta=0.0)
    torch.testing.assert_close(mv0, t_v)
    torch.testing.assert_close(mt0, t_t)
    with pytest.raises(DsmdError, match="alignment map"):
        align_fused(fused, weight.t())


def test_similarity_distributions_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    log_i2t, log_t2i = similarity_log_distributions(image, text, temperature=0.5)
    # logits = [[2, 1.2], [0, 1.6]]
    def pair(a, b):
        return [1 / (1 + math.exp(b - a)), 1 / (1 + math.exp(a - b))]

    torch.testing.assert_close(log_i2t.exp(), torch.tensor([pair(2, 1.2), pair(0, 1.6)]))
    torch.testing.assert_close(log_t2i.exp(), torch.tensor([pair(2, 0), pair(1.2, 1.6)]))


def test_kl_by_hand_and_zero_probabilities():
    log_p = torch.log(torch.tensor([[0.5, 0.5]]))
    log_q = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(log_p, log_q).item() == pytest.approx(want, rel=1e-6)
    # Two rows: the mean; a zero-probability teacher entry adds exactly nothing (no 0 * inf).
    log_p2 = torch.log(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    log_q2 = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    assert kl_divergence(log_p2, log_q2).item() == pytest.approx((want + math.log(2)) / 2, rel=1e-6)


def test_mixture_is_the_weighted_average_of_probabilities():
    p1 = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    p2 = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    mixed = mix_log_distributions([p1.log(), p2.log()], [3.0, 1.0]).exp()
    torch.testing.assert_close(mixed, 0.75 * p1 + 0.25 * p2)
    # A zero weight drops a teacher.
    torch.testing.assert_close(mix_log_distributions([p1.log(), p2.log()], [0.0, 2.0]).exp(), p2)


def reference_kl(s_v, s_t, teachers, weights, tau) -> tuple[float, float]:
    """Plain loops in float64: P = softmax(sim / tau) per row / column, mixed as probabilities."""
    def softmax(values):
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        return [e / sum(exps) for e in exps]

    def sims(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return [[float(a[k] @ b[j]) / tau for j in range(len(b))] for k in range(len(a))]

    total_w = sum(weights)
    out = []
    for direction in ("i2t", "t2i"):
        student = sims(s_v, s_t)
        per_teacher = [sims(tv, tt) for tv, tt in teachers]
        if direction == "t2i":
            student = [list(col) for col in zip(*student, strict=True)]
            per_teacher = [[list(col) for col in zip(*m, strict=True)] for m in per_teacher]
        kl = 0.0
        for row in range(len(student)):
            q = softmax(student[row])
            p = [0.0] * len(q)
            for w, m in zip(weights, per_teacher, strict=True):
                for j, v in enumerate(softmax(m[row])):
                    p[j] += w / total_w * v
            kl += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True) if pj > 0)
        out.append(kl / len(student))
    return out[0], out[1]


def test_distribution_distillation_matches_plain_reference_with_two_teachers():
    s_v, s_t = unit((5, 4), seed=1), unit((5, 4), seed=2)
    # Teachers of other dimensions than the student: distributions only need their own similarities.
    teachers = [(unit((5, 6), seed=3), unit((5, 6), seed=4)), (unit((5, 3), seed=5), unit((5, 3), seed=6))]
    loss = DistributionDistillation(temperature=0.2, weights=[2.0, 1.0])
    values = loss(s_v, s_t, teachers)
    want_i2t, want_t2i = reference_kl(s_v, s_t, teachers, [2.0, 1.0], 0.2)
    assert values["kl_i2t"].item() == pytest.approx(want_i2t, rel=1e-5)
    assert values["kl_t2i"].item() == pytest.approx(want_t2i, rel=1e-5)
    assert values["kl"].item() == pytest.approx(want_i2t + want_t2i, rel=1e-5)


def one_teacher_losses(beta=0.5, **changes) -> tuple[McadLosses, torch.Tensor]:
    cfg = McadConfig(beta=beta, temperature=0.1, teachers=["dual"], teacher_weights=[1.0], **changes)
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    return McadLosses(cfg, {"dual": weight}), weight


def test_kl_and_mfd_are_zero_when_the_student_reproduces_the_modified_teacher():
    losses, _ = one_teacher_losses()
    t_v, t_t, fused = unit((6, 4), seed=7), unit((6, 4), seed=8), unit((6, 6), seed=9)
    mv, mt = losses.modified({"dual": (t_v, t_t)}, fused)["dual"]
    values = losses(mv.clone(), mt.clone(), {"dual": (t_v, t_t)}, fused)
    assert values["kl"].abs().item() < 1e-6
    assert values["mfd"].item() == 0.0
    # ... and not zero for the unmodified teacher features, since beta > 0 moved them.
    assert losses(t_v, t_t, {"dual": (t_v, t_t)}, fused)["mfd"].item() > 1e-3


def test_mfd_by_hand():
    s_v = torch.tensor([[1.0, 0.0]])
    s_t = torch.tensor([[0.0, 1.0]])
    tm_v = torch.tensor([[0.6, 0.8]])
    tm_t = torch.tensor([[0.0, 1.0]])
    values = ModifiedFeatureDistillation()(s_v, s_t, tm_v, tm_t)
    assert values["mfd_v"].item() == pytest.approx(0.6)  # (|1 - 0.6| + |0 - 0.8|) / 2
    assert values["mfd_t"].item() == 0.0
    assert values["mfd"].item() == pytest.approx(0.6)
    with pytest.raises(DsmdError, match="head dimension"):
        ModifiedFeatureDistillation()(s_v, s_t, torch.ones(1, 3), torch.ones(1, 3))


def test_mcad_losses_end_to_end_matches_the_pieces():
    losses, weight = one_teacher_losses(beta=0.7)
    s_v, s_t = unit((5, 4), seed=10), unit((5, 4), seed=11)
    t_v, t_t, fused = unit((5, 4), seed=12), unit((5, 4), seed=13), unit((5, 6), seed=14)
    values = losses(s_v, s_t, {"dual": (t_v, t_t)}, fused)
    aligned = F.normalize(fused @ weight, dim=-1)
    mv = F.normalize(t_v + 0.7 * aligned, dim=-1)
    mt = F.normalize(t_t + 0.7 * aligned, dim=-1)
    want_i2t, want_t2i = reference_kl(s_v, s_t, [(mv, mt)], [1.0], 0.1)
    assert values["kl"].item() == pytest.approx(want_i2t + want_t2i, rel=1e-5)
    assert values["mfd"].item() == pytest.approx(
        ((s_v - mv).abs().mean() + (s_t - mt).abs().mean()).item(), rel=1e-6
    )
    assert losses.names == ["kl", "mfd"]
    assert set(losses.top_level(values)) == {"kl", "mfd"}


def test_gradient_reaches_only_the_student():
    losses, _ = one_teacher_losses()
    assert list(losses.parameters()) == []  # the maps are fixed buffers
    s_raw_v = torch.randn(4, 4, requires_grad=True)
    s_raw_t = torch.randn(4, 4, requires_grad=True)
    t_v = unit((4, 4), seed=15).requires_grad_(True)
    t_t = unit((4, 4), seed=16).requires_grad_(True)
    fused = unit((4, 6), seed=17).requires_grad_(True)
    values = losses(F.normalize(s_raw_v, dim=-1), F.normalize(s_raw_t, dim=-1), {"dual": (t_v, t_t)}, fused)
    (values["kl"] + values["mfd"]).backward()
    for grad in (s_raw_v.grad, s_raw_t.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert t_v.grad is None and t_t.grad is None and fused.grad is None
    assert losses.align_0.grad is None and not losses.align_0.requires_grad


def test_first_teacher_sets_the_feature_target_and_all_set_the_distribution():
    cfg = McadConfig(beta=0.5, temperature=0.1, teachers=["a", "b"], teacher_weights=[1.0, 3.0])
    maps = {"a": torch.randn(6, 4, generator=torch.Generator().manual_seed(1)),
            "b": torch.randn(6, 8, generator=torch.Generator().manual_seed(2))}
    losses = McadLosses(cfg, maps)
    s_v, s_t = unit((3, 4), seed=20), unit((3, 4), seed=21)
    feats = {"a": (unit((3, 4), seed=22), unit((3, 4), seed=23)), "b": (unit((3, 8), seed=24), unit((3, 8), seed=25))}
    fused = unit((3, 6), seed=26)
    values = losses(s_v, s_t, feats, fused)
    modified = losses.modified(feats, fused)
    want_i2t, want_t2i = reference_kl(s_v, s_t, [modified["a"], modified["b"]], [1.0, 3.0], 0.1)
    assert values["kl"].item() == pytest.approx(want_i2t + want_t2i, rel=1e-5)
    mfd_a = ModifiedFeatureDistillation()(s_v, s_t, *modified["a"])["mfd"]
    assert values["mfd"].item() == pytest.approx(mfd_a.item())


def test_same_image_columns_share_the_teacher_mass():
    # Two captions of one image with the same text feature and the same fused row: identical columns, so the
    # image's row spreads its mass equally over them; nothing is masked.
    losses, _ = one_teacher_losses(beta=0.0)
    t_v = unit([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    t_t = unit([[0.9, 0.1, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0]])
    log_i2t, _ = losses.kl.teacher_log_distributions([(t_v, t_t)])
    p = log_i2t.exp()
    assert p[0, 0].item() == pytest.approx(p[0, 1].item())
    assert p[0, 0].item() + p[0, 1].item() > 0.99


def test_configuration_errors():
    weight = {"dual": torch.zeros(2, 2)}
    with pytest.raises(ConfigError, match="teacher_weights has 2"):
        McadLosses(McadConfig(teachers=["dual"], teacher_weights=[1.0, 1.0]), weight)
    with pytest.raises(ConfigError, match="positive sum"):
        McadLosses(McadConfig(teachers=["dual"], teacher_weights=[0.0]), weight)
    with pytest.raises(ConfigError, match="both off"):
        McadLosses(McadConfig(teachers=["dual"], teacher_weights=[1.0], kl=False, fd=False), weight)
    with pytest.raises(ConfigError, match="temperature"):
        McadLosses(McadConfig(teachers=["dual"], teacher_weights=[1.0], temperature=0.0), weight)
    with pytest.raises(DsmdError, match="extract-pairs"):
        McadLosses(McadConfig(teachers=["other"], teacher_weights=[1.0]), weight)
    losses = McadLosses(McadConfig(teachers=["dual"], teacher_weights=[1.0]), weight)
    with pytest.raises(DsmdError, match="lacks the features"):
        losses(torch.ones(1, 2), torch.ones(1, 2), {}, torch.ones(1, 2))


def test_names_combine_with_the_dsmd_losses_in_one_balancer():
    mcad, _ = one_teacher_losses()
    dsmd = DistillationLosses(LossesConfig(queue_size=8), dim=4)
    names = [*dsmd.names, *mcad.names]
    assert len(set(names)) == len(names) == 6
    balancer = DynamicBalancer.from_config(names, BalancerConfig())
    s_v, s_t = unit((4, 4), seed=30), unit((4, 4), seed=31)
    t_v, t_t, fused = unit((4, 4), seed=32), unit((4, 4), seed=33), unit((4, 6), seed=34)
    values = {**dsmd(s_v, s_t, t_v, t_t, torch.arange(4)), **mcad(s_v, s_t, {"dual": (t_v, t_t)}, fused)}
    total = balancer({**dsmd.top_level(values), **mcad.top_level(values)})
    assert torch.isfinite(total)


def test_objective_adds_the_dsmd_losses_on_the_unmodified_first_teacher():
    cfg = McadConfig(beta=0.5, temperature=0.1, teachers=["dual"], teacher_weights=[1.0], dsmd_losses=True)
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    objective = McadObjective(cfg, LossesConfig(queue_size=8), {"dual": weight}, dim=4)
    assert objective.names == ["cd", "fd", "sd", "hnd", "kl", "mfd"]
    assert not any("align" in key for key in objective.state_dict())  # maps come from the store, not checkpoints
    s_v, s_t = unit((4, 4), seed=40), unit((4, 4), seed=41)
    t_v, t_t, fused = unit((4, 4), seed=42), unit((4, 4), seed=43), unit((4, 6), seed=44)
    rows = McadRows({"dual": (t_v, t_t)}, fused)
    ids = torch.tensor([0, 0, 1, 2])
    values = objective(s_v, s_t, rows, ids)
    assert list(values) == objective.value_names()
    want_fd = FeatureDistillation()(s_v, s_t, t_v, t_t)["fd"]  # unmodified teacher features
    assert values["fd"].item() == pytest.approx(want_fd.item())
    objective.enqueue(rows, ids)
    queued, queued_ids = objective.dsmd.cd.queues["v"].valid()
    torch.testing.assert_close(queued, t_v)
    assert queued_ids.tolist() == ids.tolist()
    # Without dsmd_losses: only the MCAD names, and enqueue does nothing.
    plain_cfg = McadConfig(teachers=["dual"], teacher_weights=[1.0])
    plain = McadObjective(plain_cfg, LossesConfig(), {"dual": weight}, dim=4)
    assert plain.names == ["kl", "mfd"] and plain.dsmd is None
    plain.enqueue(rows, ids)
