"""What every section shares: the run's settings, timing on the device, the device's ceilings, FLOP counts."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models.beit3 import BEiT3Config

# Dense bf16 matrix rate of the H100 / H200 SXM datasheet (both 989.4 TFLOP/s without sparsity).
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}


@dataclass(frozen=True)
class Run:
    """Settings the sections share: where to work, on what, how big (dry: tiny and on the CPU)."""

    dry: bool
    device: torch.device
    work: Path  # scratch space, kept for the whole run (sections reuse what earlier ones wrote)
    deadline: float  # time.monotonic() at which the budget is spent
    peak_tflops: float | None = None  # the device's dense bf16 peak (datasheet), for "achieved / peak"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def of_peak(self, tflops: float) -> float | None:
        return tflops / self.peak_tflops if self.peak_tflops else None

    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn(i) (i counts calls, e.g. to rotate inputs), after `warmup` untimed calls.

    On a GPU each call is timed with CUDA events around it; on the CPU with the wall clock."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(warmup, warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the repeats of one measurement are."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def beit3_flops(cfg: BEiT3Config, batch: int, tokens: int, image: bool) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of one forward of the retrieval encoder: the patch projection
    (images), q/k/v, the two attention products, out_proj, the FFN and the retrieval head. Norms, softmax and
    GELU are left out, as FLOP counters do."""
    d, f = cfg.embed_dim, cfg.ffn_dim
    per_layer = 2 * tokens * d * (3 * d) + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * f
    total = cfg.layers * per_layer + 2 * d * d  # the head on the cls position
    if image:
        total += 2 * cfg.num_patches * (cfg.in_chans * cfg.patch_size**2) * d
    return batch * total


def device_facts(device: torch.device) -> dict:
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        facts.update(
            device=name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            bf16_peak_tflops=next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None),
        )
    else:
        facts.update(device=f"cpu ({platform.processor() or platform.machine()}, {facts['cpu_cores']} cores)",
                     bf16_peak_tflops=None)
    return facts


def matmul_ceiling(device: torch.device, n: int) -> float:
    """Measured TFLOP/s of an n x n x n bf16 matrix product on random data (median of 10, after 3)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda _: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / median(times) / 1e12


def free_memory(device: torch.device) -> None:
    """Between sections: drop what the last one left, so the next starts with an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
