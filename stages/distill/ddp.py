"""torchrun / DistributedDataParallel plumbing. torchrun's own environment (RANK, WORLD_SIZE, LOCAL_RANK) is the
standard contract for a process launched by it; nothing else is read from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_from_torchrun(device_type: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_with_grad(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """All ranks' rows in rank order; gradients flow back to each rank's own rows (in-batch negatives)."""
    if not ranks.distributed:
        return tensor
    return torch.cat(dist_fn.all_gather(tensor.contiguous()))


def gather_plain(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if not ranks.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ranks.world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
