"""The no-teacher baseline: the same student trained on the ground-truth pairs with CLIP's symmetric InfoNCE.

It answers the first question a distillation result has to face: what does the teacher add over training the
same student, on the same pairs and schedule, directly on the captions? No teacher features are read.

Objective (CLIP, Radford et al. 2021): logits = exp(logit_scale) * s_v s_t^T over the batch, positives on the
diagonal, cross-entropy both ways (image -> caption rows, caption -> image columns), averaged. logit_scale is
learnable, starts at log(1 / 0.07) and is clamped to at most log(100) as CLIP does, so the temperature never
falls below 0.01.

Same-image rule: a batch may hold two captions of one image (COCO and Flickr have five per image). Such an
off-diagonal pair is a true match, so it is masked out of both softmaxes rather than pushed apart as a negative;
the diagonal stays the one positive of its row and column.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DsmdError

__all__ = ["INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE", "symmetric_infonce", "SupervisedContrastive"]

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


def symmetric_infonce(
    s_v: torch.Tensor, s_t: torch.Tensor, logit_scale: torch.Tensor, image_ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Named values: ``i2t`` and ``t2i`` (mean cross-entropy each way) and ``infonce`` (their mean).

    s_v, s_t: (B, D) L2-normalised; row k of each is the pair k. image_ids (B,): pairs that share an image are
    not negatives of each other (masked out); None treats every off-diagonal pair as a negative."""
    if s_v.ndim != 2 or s_v.shape != s_t.shape:
        raise DsmdError(f"InfoNCE needs image and text features of one shape (B, D); got {tuple(s_v.shape)} "
                        f"and {tuple(s_t.shape)}")
    batch = s_v.shape[0]
    with torch.autocast(device_type=s_v.device.type, enabled=False):
        scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
        logits = scale * (s_v.float() @ s_t.float().T)
        if image_ids is not None:
            if tuple(image_ids.shape) != (batch,):
                raise DsmdError(f"image_ids must have shape ({batch},), got {tuple(image_ids.shape)}")
            same = image_ids[:, None] == image_ids[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        targets = torch.arange(batch, device=logits.device)
        i2t = F.cross_entropy(logits, targets)
        t2i = F.cross_entropy(logits.T, targets)
    return {"i2t": i2t, "t2i": t2i, "infonce": (i2t + t2i) / 2}


class SupervisedContrastive(nn.Module):
    """CLIP's objective with its learnable temperature, shaped like the distillation objectives: ``forward``
    returns named values, ``names`` the one top-level loss, ``enqueue`` does nothing (no teacher, no queue).

    The logit scale is a parameter of this module: the trainer must optimise it with the student."""

    names = ["infonce"]

    def __init__(self, init_logit_scale: float = INIT_LOGIT_SCALE):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def forward(self, s_v: torch.Tensor, s_t: torch.Tensor, image_ids: torch.Tensor | None = None):
        values = symmetric_infonce(s_v, s_t, self.logit_scale, image_ids)
        temperature = 1 / self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp()
        return {**values, "temperature": temperature}

    def top_level(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"infonce": values["infonce"]}

    def enqueue(self, *_: torch.Tensor) -> None:
        pass

    @torch.no_grad()
    def clamp_(self) -> None:
        """Pull the parameter back to the clamp after an optimiser step (as CLIP does): past it the forward's
        clamp passes no gradient, and a scale left there could never learn its way down again."""
        self.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
