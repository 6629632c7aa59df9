"""The four DSMD distillation losses (METHOD.md, "Losses"), each a function of tensors wrapped in an nn.Module.

Notation: s_v, s_t are the student's image and text features, t_v, t_t the teacher's, all B x D and
L2-normalised; image_ids (B,) names the image of every pair, so items that show the same image are never
treated as negatives of each other. Every module's forward returns a dict of named scalar tensors: the
per-modality (or per-pair) parts and the top-level value under the loss's own name ("cd", "fd", "sd", "hnd").
Losses are computed in float32 whatever precision the encoders ran in.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LossesConfig
from pipeline.errors import ConfigError, DsmdError
from stages.distill.queue import FeatureQueue

__all__ = [
    "LOSS_NAMES",
    "HND_MODES",
    "contrastive_distillation",
    "hard_negative_triplet",
    "ContrastiveDistillation",
    "FeatureDistillation",
    "SimilarityDistillation",
    "HardNegativeDistillation",
    "DistillationLosses",
]

LOSS_NAMES = ("cd", "fd", "sd", "hnd")
HND_MODES = ("hardest", "hardest_sum", "all_sum")
HndMode = Literal["hardest", "hardest_sum", "all_sum"]


def _check_features(**named: torch.Tensor) -> None:
    shapes = {name: tuple(x.shape) for name, x in named.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(shape != first for shape in shapes.values()):
        detail = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DsmdError(
            f"distillation losses need student and teacher features of one shape (B, D); got {detail} "
            "(does the student's head dimension match the teacher's?)"
        )


def _no_autocast(x: torch.Tensor):
    """Matmuls under autocast run in half precision even on float32 inputs; the losses want float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_ids(image_ids: torch.Tensor | None, batch: int) -> None:
    if image_ids is not None and tuple(image_ids.shape) != (batch,):
        raise DsmdError(f"image_ids must have shape ({batch},), got {tuple(image_ids.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Contrastive distillation with a queue of teacher features.


def contrastive_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue_features: torch.Tensor,
    tau: float,
    image_ids: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of CE([s.t, s.Q] / tau, target 0).

    The positive is the sample's own teacher feature; the negatives are the queue's entries, less those whose
    image id equals the sample's (when both id tensors are given). With an empty queue the only logit is the
    positive and the loss is 0 (no negatives yet, nothing to learn from).
    """
    s = student.float()
    t = teacher.float()
    positive = (s * t).sum(dim=-1, keepdim=True)
    with _no_autocast(s):
        negatives = s @ queue_features.float().t()
    if image_ids is not None and queue_ids is not None:
        same_image = image_ids.to(queue_ids.device).view(-1, 1) == queue_ids.view(1, -1)
        negatives = negatives.masked_fill(same_image, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / tau
    target = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    return F.cross_entropy(logits, target)


class ContrastiveDistillation(nn.Module):
    """L_CD = L_CD^v + L_CD^t; owns one FeatureQueue per modality (filled with ``enqueue`` after each step)."""

    def __init__(self, dim: int, queue_size: int = 8192, tau: float = 0.05, mask_same_image: bool = True):
        super().__init__()
        if tau <= 0:
            raise ConfigError(f"distill.losses.tau must be positive, got {tau}")
        self.tau = tau
        self.mask_same_image = mask_same_image
        self.queues = nn.ModuleDict({"v": FeatureQueue(queue_size, dim), "t": FeatureQueue(queue_size, dim)})

    def forward(
        self,
        s_v: torch.Tensor,
        s_t: torch.Tensor,
        t_v: torch.Tensor,
        t_t: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        _check_features(s_v=s_v, s_t=s_t, t_v=t_v, t_t=t_t)
        _check_ids(image_ids, s_v.shape[0])
        out = {}
        for modality, student, teacher in (("v", s_v, t_v), ("t", s_t, t_t)):
            queue_features, queue_ids = self.queues[modality].valid()
            use_ids = self.mask_same_image and image_ids is not None
            out[f"cd_{modality}"] = contrastive_distillation(
                student,
                teacher,
                queue_features,
                self.tau,
                image_ids if use_ids else None,
                queue_ids if use_ids else None,
            )
        out["cd"] = out["cd_v"] + out["cd_t"]
        return out

    @torch.no_grad()
    def enqueue(self, t_v: torch.Tensor, t_t: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Add a step's teacher features (gathered across ranks under DDP) to the queues."""
        self.queues["v"].enqueue(t_v, image_ids)
        self.queues["t"].enqueue(t_t, image_ids)


# ---------------------------------------------------------------------------------------------------------
# Feature and similarity distillation.


class FeatureDistillation(nn.Module):
    """L_FD = sum over modalities of the L1 distance between s_m and t_m, averaged over all elements."""

    def forward(
        self, s_v: torch.Tensor, s_t: torch.Tensor, t_v: torch.Tensor, t_t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        _check_features(s_v=s_v, s_t=s_t, t_v=t_v, t_t=t_t)
        fd_v = F.l1_loss(s_v.float(), t_v.float())
        fd_t = F.l1_loss(s_t.float(), t_t.float())
        return {"fd_v": fd_v, "fd_t": fd_t, "fd": fd_v + fd_t}


class SimilarityDistillation(nn.Module):
    """L_SD = sum over modalities of mean over the batch of 1 - cos(s_m, t_m)."""

    def forward(
        self, s_v: torch.Tensor, s_t: torch.Tensor, t_v: torch.Tensor, t_t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        _check_features(s_v=s_v, s_t=s_t, t_v=t_v, t_t=t_t)
        sd_v = (1.0 - F.cosine_similarity(s_v.float(), t_v.float(), dim=-1)).mean()
        sd_t = (1.0 - F.cosine_similarity(s_t.float(), t_t.float(), dim=-1)).mean()
        return {"sd_v": sd_v, "sd_t": sd_t, "sd": sd_v + sd_t}


# ---------------------------------------------------------------------------------------------------------
# Hard negative distillation.


def _hinge_rows(scores: torch.Tensor, not_negative: torch.Tensor, margin: float, mode: str) -> torch.Tensor:
    """Row direction of the triplet loss: anchor k, positive scores[k, k], negatives scores[k, l]."""
    positive = scores.diagonal().view(-1, 1)
    negatives = scores.masked_fill(not_negative, float("-inf"))
    if mode == "all_sum":
        # Masked entries are -inf and clamp to 0, so they add nothing.
        return (margin - positive + negatives).clamp(min=0).sum()
    hardest = negatives.max(dim=1, keepdim=True).values
    # A row with no negative at all (every item shows its image) has hardest = -inf and contributes 0.
    per_anchor = (margin - positive + hardest).clamp(min=0)
    return per_anchor.sum() if mode == "hardest_sum" else per_anchor.mean()


def hard_negative_triplet(
    a: torch.Tensor,
    b: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.0,
    mode: HndMode = "hardest",
) -> torch.Tensor:
    """Bidirectional hinge triplet loss for feature sets a (anchors) and b, S = a b^T, positives on the diagonal.

    "hardest": mean over anchors of the hinge with the hardest negative (the paper); "hardest_sum": the same
    summed over anchors; "all_sum": summed over anchors and every negative (the official code's default).
    Items with the same image id are not negatives; a mean still divides by the whole batch.
    """
    if mode not in HND_MODES:
        raise ConfigError(f"distill.losses.hnd_mode must be one of {', '.join(HND_MODES)}, got {mode!r}")
    with _no_autocast(a):
        scores = a.float() @ b.float().t()
    batch = scores.shape[0]
    not_negative = torch.eye(batch, dtype=torch.bool, device=scores.device)
    if image_ids is not None:
        ids = image_ids.to(scores.device)
        not_negative = not_negative | (ids.view(-1, 1) == ids.view(1, -1))
    # Columns: anchor k in b against the rows of a; the same-image mask is symmetric.
    return _hinge_rows(scores, not_negative, margin, mode) + _hinge_rows(scores.t(), not_negative, margin, mode)


class HardNegativeDistillation(nn.Module):
    """L_HND over the pairs (s_v, t_v), (s_t, t_t), (s_v, t_t), (s_t, t_v), summed."""

    def __init__(self, margin: float = 0.0, mode: HndMode = "hardest"):
        super().__init__()
        if mode not in HND_MODES:
            raise ConfigError(f"distill.losses.hnd_mode must be one of {', '.join(HND_MODES)}, got {mode!r}")
        self.margin = margin
        self.mode = mode

    def forward(
        self,
        s_v: torch.Tensor,
        s_t: torch.Tensor,
        t_v: torch.Tensor,
        t_t: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        _check_features(s_v=s_v, s_t=s_t, t_v=t_v, t_t=t_t)
        _check_ids(image_ids, s_v.shape[0])
        out = {
            f"hnd_{name}": hard_negative_triplet(a, b, image_ids, self.margin, self.mode)
            for name, a, b in (("vv", s_v, t_v), ("tt", s_t, t_t), ("vt", s_v, t_t), ("tv", s_t, t_v))
        }
        out["hnd"] = out["hnd_vv"] + out["hnd_tt"] + out["hnd_vt"] + out["hnd_tv"]
        return out


# ---------------------------------------------------------------------------------------------------------
# All enabled losses together.


class DistillationLosses(nn.Module):
    """The losses enabled in LossesConfig; ``names`` lists the M enabled top-level losses in a fixed order.

    ``forward`` returns every named value (parts and top-level losses) in one dict; the balancer combines
    ``{name: values[name] for name in names}``. After the optimiser step call ``enqueue`` with the step's
    teacher features (gathered across ranks under DDP) so the CD queues move on. The queues are buffers, so
    this module's state_dict is what a checkpoint needs.
    """

    def __init__(self, cfg: LossesConfig, dim: int):
        super().__init__()
        if cfg.margin < 0:
            raise ConfigError(f"distill.losses.margin must be 0 or more, got {cfg.margin}")
        self.names: list[str] = [name for name in LOSS_NAMES if getattr(cfg, name)]
        if not self.names:
            raise ConfigError("distill.losses: every loss is switched off; enable at least one of cd, fd, sd, hnd")
        self.cd = ContrastiveDistillation(dim, cfg.queue_size, cfg.tau, cfg.queue_mask_same_image) if cfg.cd else None
        self.fd = FeatureDistillation() if cfg.fd else None
        self.sd = SimilarityDistillation() if cfg.sd else None
        self.hnd = HardNegativeDistillation(cfg.margin, cfg.hnd_mode) if cfg.hnd else None

    def forward(
        self,
        s_v: torch.Tensor,
        s_t: torch.Tensor,
        t_v: torch.Tensor,
        t_t: torch.Tensor,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        if self.cd is not None:
            values.update(self.cd(s_v, s_t, t_v, t_t, image_ids))
        if self.fd is not None:
            values.update(self.fd(s_v, s_t, t_v, t_t))
        if self.sd is not None:
            values.update(self.sd(s_v, s_t, t_v, t_t))
        if self.hnd is not None:
            values.update(self.hnd(s_v, s_t, t_v, t_t, image_ids))
        return values

    def top_level(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The M enabled losses, in ``names`` order, from a dict ``forward`` returned."""
        return {name: values[name] for name in self.names}

    @torch.no_grad()
    def enqueue(self, t_v: torch.Tensor, t_t: torch.Tensor, image_ids: torch.Tensor) -> None:
        if self.cd is not None:
            self.cd.enqueue(t_v, t_t, image_ids)
