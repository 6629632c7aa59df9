"""FIFO queue of teacher features for contrastive distillation (METHOD.md, loss 1).

One queue per modality holds the teacher features of the last K training samples and the image id of each,
so the loss can drop negatives that show the positive's own image (5 captions per image put copies of it in
the queue). The queue is an nn.Module whose buffers (features, ids, pointer, filled count) travel with
``state_dict`` into checkpoints and follow ``.to(device)``.

Under DDP every rank must hold the same queue: the caller gathers the batch's teacher features and ids from all
ranks with ``gather_for_queue`` and enqueues the gathered tensors on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import DsmdError

__all__ = ["FeatureQueue", "gather_for_queue"]


class FeatureQueue(nn.Module):
    """K x D ring buffer of (detached) teacher features with one image id per entry; empty ids are -1."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if size < 1:
            raise DsmdError(f"distill.losses.queue_size must be at least 1, got {size}")
        if dim < 1:
            raise DsmdError(f"queue feature dimension must be at least 1, got {dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("features", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        # Next write position and number of valid entries; 0-d tensors so they live in state_dict.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor) -> None:
        """Append a batch (B x D, B ids), overwriting the oldest entries; B may exceed K (the last K stay)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise DsmdError(f"queue expects features of shape (B, {self.dim}), got {tuple(features.shape)}")
        if ids.ndim != 1 or ids.shape[0] != features.shape[0]:
            raise DsmdError(f"queue expects one image id per feature row, got ids of shape {tuple(ids.shape)}")
        n = features.shape[0]
        if n == 0:
            return
        positions = (int(self.ptr) + torch.arange(n, device=self.features.device)) % self.size
        # With n > K only the newest K rows survive; writing them alone keeps each position written once.
        keep = min(n, self.size)
        self.features[positions[-keep:]] = features[-keep:].detach().to(self.features.dtype)
        self.ids[positions[-keep:]] = ids[-keep:].to(device=self.ids.device, dtype=torch.long)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, ids) of the filled entries, in storage order (what the loss needs; order is irrelevant).

        Entries are written from position 0 upwards, so while the queue is filling the valid ones are the first
        ``filled`` rows.
        """
        n = int(self.filled)
        return self.features[:n], self.ids[:n]

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, ids) of the filled entries from oldest to newest."""
        n = int(self.filled)
        if n < self.size:
            return self.features[:n], self.ids[:n]
        p = int(self.ptr)
        return torch.cat([self.features[p:], self.features[:p]]), torch.cat([self.ids[p:], self.ids[:p]])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Called for this queue alone and as a submodule of a bigger module. A queue of another size or width
        # cannot be resumed: say which setting changed instead of a size-mismatch traceback.
        saved = state_dict.get(prefix + "features")
        if saved is not None and tuple(saved.shape) != (self.size, self.dim):
            raise DsmdError(
                f"checkpointed queue has shape {tuple(saved.shape)} but this run uses "
                f"({self.size}, {self.dim}); resume with the same distill.losses.queue_size and teacher"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


def gather_for_queue(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (first dim = batch) from every DDP rank in rank order; identity without DDP.

    Ranks may hold batches of different sizes (the last, partial batch): sizes are exchanged first and the
    batches padded to the largest, then trimmed after the gather.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    tensor = tensor.detach().contiguous()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    largest = max(counts)
    if tensor.shape[0] < largest:
        pad = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
