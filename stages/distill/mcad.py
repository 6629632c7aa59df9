"""MCAD losses (METHOD.md, "MCAD, the second method"; the formulation is ours, as documented there).

For a batch of B pairs k = (image i_k, caption j_k):
- fused feature: f(k) = normalize(fused(k) @ W_m), the single-stream teacher's pair feature carried into dual
  teacher m's space by its fixed least-squares map W_m (fitted by stages/extract/align.py, stored as
  pipeline/alignment.py describes);
- modified teacher features: t~_v(k) = normalize(t_v(i_k) + beta f(k)), t~_t(k) = normalize(t_t(j_k) + beta f(k));
  a row of t~_v belongs to a pair, not to an image: two captions of one image give two (slightly different)
  modified image features;
- similarity distributions over the batch, temperature tau: S = image text^T / tau (B x B),
  i2t: P(k, .) = softmax over the row S[k, :] (image k over the batch's captions),
  t2i: P(l, .) = softmax over the column S[:, l] (caption l over the batch's images);
- "kl": KL(P_T || P_S) = mean over rows of sum_l P_T log(P_T / P_S), summed over the two directions
  ("kl_i2t" + "kl_t2i"), P_S from the student's s_v, s_t and P_T from the modified teacher features. With several
  dual teachers, P_T is the weighted average of their distributions (weights normalised to sum 1), each teacher
  with its own map W_m and its own features; the student's dimension plays no part in this loss;
- "mfd": feature distillation against the FIRST teacher's modified features (it defines the student's space):
  L1 distance averaged over elements, summed over modalities ("mfd_v" + "mfd_t"), as DSMD's FD.

Same image in a batch: nothing is masked. The loss has no hard targets: the teacher's distribution already
spreads its mass over every caption (row) or every copy of the image (column) of the same image, and the
student learns that spread as it is. Masking them, as a contrastive loss must, would throw that away.

Teacher-side tensors never carry gradients (computed under no_grad), so only the student learns. Everything
is computed in float32, autocast off. Every module returns a dict of named scalar tensors like losses.py, with
top-level names "kl" and "mfd" that do not clash with the DSMD losses, so both sets can feed one balancer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LossesConfig, McadConfig
from pipeline.errors import ConfigError, DsmdError
from stages.distill.losses import DistillationLosses

__all__ = [
    "MCAD_LOSS_NAMES",
    "align_fused",
    "modified_features",
    "similarity_log_distributions",
    "mix_log_distributions",
    "kl_divergence",
    "DistributionDistillation",
    "ModifiedFeatureDistillation",
    "McadLosses",
    "McadRows",
    "McadObjective",
]

MCAD_LOSS_NAMES = ("kl", "mfd")
TeacherPair = tuple[torch.Tensor, torch.Tensor]  # (image features, text features), B x D each


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def align_fused(fused: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """normalize(fused @ W): (B, d_fused) x (d_fused, d_dual) -> (B, d_dual), unit rows."""
    if fused.ndim != 2 or weight.ndim != 2 or fused.shape[1] != weight.shape[0]:
        raise DsmdError(
            f"fused features {tuple(fused.shape)} do not fit the alignment map {tuple(weight.shape)}: was the map "
            "fitted on this fused teacher? Rerun dsmd extract-pairs"
        )
    with _no_autocast(fused):
        return F.normalize(fused.float() @ weight.float().to(fused.device), dim=-1)


def modified_features(
    t_v: torch.Tensor, t_t: torch.Tensor, aligned: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalize(t_v + beta f), normalize(t_t + beta f)) for the aligned fused features f."""
    if not (t_v.shape == t_t.shape == aligned.shape) or t_v.ndim != 2:
        raise DsmdError(
            f"MCAD needs teacher image, text and aligned fused features of one shape (B, D); got "
            f"{tuple(t_v.shape)}, {tuple(t_t.shape)} and {tuple(aligned.shape)}"
        )
    f = beta * aligned.float()
    return F.normalize(t_v.float() + f, dim=-1), F.normalize(t_t.float() + f, dim=-1)


def similarity_log_distributions(
    image: torch.Tensor, text: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P_i2t (row k: image k over the captions) and log P_t2i (row l: caption l over the images), B x B."""
    with _no_autocast(image):
        logits = image.float() @ text.float().t() / temperature
    return F.log_softmax(logits, dim=1), F.log_softmax(logits.t(), dim=1)


def mix_log_distributions(log_probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log of sum_m w_m P_m (weights normalised to sum 1), computed stably from the log P_m."""
    if len(log_probs) != len(weights) or not log_probs:
        raise DsmdError(f"{len(log_probs)} distributions but {len(weights)} weights")
    if len(log_probs) == 1:
        return log_probs[0]
    total = float(sum(weights))
    stacked = torch.stack(list(log_probs))
    log_w = torch.tensor(
        [math.log(w / total) if w > 0 else -math.inf for w in weights], dtype=stacked.dtype, device=stacked.device
    ).view(-1, 1, 1)
    return torch.logsumexp(stacked + log_w, dim=0)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(P || Q) = sum_l P log(P / Q); rows are distributions given as logs."""
    p = log_p.exp()
    # Entries with P = 0 (log P = -inf) contribute exactly 0, not 0 * inf.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=1).mean()


class DistributionDistillation(nn.Module):
    """"kl" = KL(P_T || P_S) over rows (i2t) plus over columns (t2i); P_T mixed over the given teachers."""

    def __init__(self, temperature: float = 0.05, weights: Sequence[float] = (1.0,)):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"distill.mcad.temperature must be positive, got {temperature}")
        _check_weights(weights)
        self.temperature = temperature
        self.weights = [float(w) for w in weights]

    def teacher_log_distributions(self, teachers: Sequence[TeacherPair]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(teachers) != len(self.weights):
            raise DsmdError(f"{len(teachers)} teachers' features given, {len(self.weights)} teacher weights configured")
        with torch.no_grad():
            pairs = [similarity_log_distributions(t_v, t_t, self.temperature) for t_v, t_t in teachers]
            return (
                mix_log_distributions([p[0] for p in pairs], self.weights),
                mix_log_distributions([p[1] for p in pairs], self.weights),
            )

    def forward(self, s_v: torch.Tensor, s_t: torch.Tensor, teachers: Sequence[TeacherPair]) -> dict[str, torch.Tensor]:
        batch = s_v.shape[0]
        for t_v, t_t in teachers:
            if t_v.shape[0] != batch or t_t.shape[0] != batch or s_t.shape[0] != batch:
                raise DsmdError(f"student and teacher batches differ in size: {batch} vs {t_v.shape[0]}")
        t_i2t, t_t2i = self.teacher_log_distributions(teachers)
        s_i2t, s_t2i = similarity_log_distributions(s_v, s_t, self.temperature)
        kl_i2t = kl_divergence(t_i2t, s_i2t)
        kl_t2i = kl_divergence(t_t2i, s_t2i)
        return {"kl_i2t": kl_i2t, "kl_t2i": kl_t2i, "kl": kl_i2t + kl_t2i}


class ModifiedFeatureDistillation(nn.Module):
    """"mfd" = sum over modalities of the L1 distance between s_m and t~_m, averaged over all elements."""

    def forward(
        self, s_v: torch.Tensor, s_t: torch.Tensor, tm_v: torch.Tensor, tm_t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if not (s_v.shape == s_t.shape == tm_v.shape == tm_t.shape):
            raise DsmdError(
                f"MCAD feature distillation needs student and first-teacher features of one shape; got student "
                f"{tuple(s_v.shape)}, teacher {tuple(tm_v.shape)} (the student's head dimension must match "
                "the first dual teacher's, distill.mcad.teachers[0])"
            )
        mfd_v = F.l1_loss(s_v.float(), tm_v.detach().float())
        mfd_t = F.l1_loss(s_t.float(), tm_t.detach().float())
        return {"mfd_v": mfd_v, "mfd_t": mfd_t, "mfd": mfd_v + mfd_t}


def _check_weights(weights: Sequence[float]) -> None:
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"distill.mcad.teacher_weights must be finite, 0 or more, with a positive sum; got {list(weights)}"
        )


class McadLosses(nn.Module):
    """The enabled MCAD losses with the fixed alignment maps of the dual teachers.

    alignments: teacher name -> W (d_fused x d_teacher), one per name in cfg.teachers (numpy or tensor).
    The maps are non-persistent buffers: they come from the store every run, not from checkpoints.
    ``names`` lists the enabled top-level losses ("kl", "mfd" in that order); ``top_level`` picks them.
    """

    def __init__(self, cfg: McadConfig, alignments: Mapping[str, np.ndarray | torch.Tensor]):
        super().__init__()
        teachers = list(cfg.teachers)
        if not teachers:
            raise ConfigError("distill.mcad.teachers is empty: name at least one dual-stream teacher")
        if len(set(teachers)) != len(teachers):
            raise ConfigError(f"distill.mcad.teachers names a teacher twice: {teachers}")
        if len(cfg.teacher_weights) != len(teachers):
            raise ConfigError(
                f"distill.mcad.teacher_weights has {len(cfg.teacher_weights)} entries for {len(teachers)} teachers"
            )
        if not math.isfinite(cfg.beta):
            raise ConfigError(f"distill.mcad.beta must be a finite number, got {cfg.beta}")
        missing = [t for t in teachers if t not in alignments]
        if missing:
            raise DsmdError(f"no alignment map for teacher(s) {', '.join(missing)}: run dsmd extract-pairs")
        self.teachers = teachers
        self.beta = float(cfg.beta)
        self.names: list[str] = [name for name, on in (("kl", cfg.kl), ("mfd", cfg.fd)) if on]
        if not self.names:
            raise ConfigError("distill.mcad: kl and fd are both off; enable at least one")
        for index, name in enumerate(teachers):
            weight = torch.as_tensor(np.asarray(alignments[name], dtype=np.float32))
            self.register_buffer(f"align_{index}", weight, persistent=False)
        self.kl = DistributionDistillation(cfg.temperature, cfg.teacher_weights) if cfg.kl else None
        self.mfd = ModifiedFeatureDistillation() if cfg.fd else None

    def alignment(self, teacher: str) -> torch.Tensor:
        return getattr(self, f"align_{self.teachers.index(teacher)}")

    @torch.no_grad()
    def modified(self, teacher_features: Mapping[str, TeacherPair], fused: torch.Tensor) -> dict[str, TeacherPair]:
        """Teacher name -> (t~_v, t~_t) for every configured teacher, in cfg.teachers order."""
        missing = [t for t in self.teachers if t not in teacher_features]
        if missing:
            raise DsmdError(f"the batch lacks the features of MCAD teacher(s) {', '.join(missing)}")
        out = {}
        for name in self.teachers:
            t_v, t_t = teacher_features[name]
            out[name] = modified_features(t_v, t_t, align_fused(fused, self.alignment(name)), self.beta)
        return out

    def forward(
        self, s_v: torch.Tensor, s_t: torch.Tensor, teacher_features: Mapping[str, TeacherPair], fused: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """teacher_features: name -> (t_v rows of the pairs' images, t_t rows of their captions); fused: the
        pairs' fused rows (B, d_fused). Returns every named value; ``top_level`` picks the losses."""
        modified = self.modified(teacher_features, fused)
        values: dict[str, torch.Tensor] = {}
        if self.kl is not None:
            values.update(self.kl(s_v, s_t, [modified[name] for name in self.teachers]))
        if self.mfd is not None:
            values.update(self.mfd(s_v, s_t, *modified[self.teachers[0]]))
        return values

    def top_level(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: values[name] for name in self.names}


class McadRows(NamedTuple):
    """A batch's teacher side: dual teacher name -> (t_v, t_t), and the fused rows (B, d_fused)."""

    features: dict[str, TeacherPair]
    fused: torch.Tensor


class McadObjective(nn.Module):
    """Everything distill.method=mcad trains with: the MCAD losses and, when distill.mcad.dsmd_losses is on,
    the DSMD losses of distill.losses on the first teacher's UNMODIFIED features (its CD queue included).

    Drop-in for DistillationLosses in the training loop: ``names`` (balancer order: DSMD names first, then
    "kl", "mfd"), ``forward(s_v, s_t, rows, image_ids)`` -> named values, ``top_level``, ``enqueue(rows,
    image_ids)`` after each step, ``value_names(device)`` for the log columns; the state_dict holds only the
    DSMD queues (the alignment maps are non-persistent).
    """

    def __init__(
        self, cfg: McadConfig, losses_cfg: LossesConfig, alignments: Mapping[str, np.ndarray | torch.Tensor], dim: int
    ):
        super().__init__()
        self.mcad = McadLosses(cfg, alignments)
        self.dsmd = DistillationLosses(losses_cfg, dim) if cfg.dsmd_losses else None
        self.primary = self.mcad.teachers[0]
        self.dim = dim
        self.names: list[str] = [*(self.dsmd.names if self.dsmd is not None else []), *self.mcad.names]

    def forward(
        self, s_v: torch.Tensor, s_t: torch.Tensor, rows: McadRows, image_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        if self.dsmd is not None:
            t_v, t_t = rows.features[self.primary]
            values.update(self.dsmd(s_v, s_t, t_v, t_t, image_ids))
        values.update(self.mcad(s_v, s_t, rows.features, rows.fused))
        return values

    def top_level(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: values[name] for name in self.names}

    @torch.no_grad()
    def enqueue(self, rows: McadRows, image_ids: torch.Tensor) -> None:
        if self.dsmd is not None:
            self.dsmd.enqueue(*rows.features[self.primary], image_ids)

    @torch.no_grad()
    def value_names(self, device: torch.device | str = "cpu") -> list[str]:
        """Every name forward returns, in order (from a probe batch of two pairs)."""
        features = {}
        for name in self.mcad.teachers:
            dim = self.mcad.alignment(name).shape[1]
            probe = F.normalize(torch.ones(2, dim, device=device), dim=-1)
            features[name] = (probe, probe)
        fused = F.normalize(torch.ones(2, self.mcad.alignment(self.primary).shape[0], device=device), dim=-1)
        student = F.normalize(torch.ones(2, self.dim, device=device), dim=-1)
        return list(self(student, student, McadRows(features, fused), torch.arange(2, device=device)))
