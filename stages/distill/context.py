"""Where and how a distill run executes: its ranks (torchrun), device, micro-batch size and output directory.

Nothing here changes what the run computes; everything else in the run reads these from one RunContext.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.errors import DsmdError
from stages.distill.ddp import Ranks, init_from_torchrun


@dataclass(frozen=True)
class RunContext:
    cfg: Config
    ranks: Ranks
    device: torch.device
    micro_batch: int  # pairs per forward pass, summed over ranks
    out: Path


def device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _device(name: str, ranks: Ranks) -> torch.device:
    if name == "auto":
        name = device_type(name)
    if name == "cuda" and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def start_run(cfg: Config) -> RunContext:
    """Join torchrun's process group (if launched by it), pick the device, check the batch split, make out_dir."""
    dc = cfg.distill
    # The backend follows the device the run will use (nccl for GPUs, also when device is "auto").
    ranks = init_from_torchrun(device_type(dc.device))
    device = _device(dc.device, ranks)
    micro = dc.batch_size // dc.grad_accum
    if dc.batch_size % dc.grad_accum or micro % ranks.world:
        raise DsmdError(
            f"distill.batch_size ({dc.batch_size}) must split evenly into grad_accum ({dc.grad_accum}) "
            f"micro-batches over {ranks.world} rank(s)"
        )
    out = Path(dc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return RunContext(cfg, ranks, device, micro, out)
