"""Host memory while loading a BEiT-3 teacher: peak resident memory (RSS) over the checkpoint's size, the way
the teacher loaded before (the whole file read, then copied into a second, float32 model) against the way it
loads now (`load_beit3_weights`: file memory mapped, model built on the meta device, each tensor copied or cast
into it and its pages given back). Target: <= 1.2 x the file for a float32 run.

Each measurement runs in a fresh process: its RSS high-water mark is reset after the imports (Linux
/proc/self/clear_refs), so the figure is what loading adds on top of an interpreter with torch loaded.
The checkpoint holds random weights in the official layout and float32, as the published files do.

    python benchmarks/teacher_load_memory.py                       # BEiT-3 base width, 6 layers (~523 MiB)
    python benchmarks/teacher_load_memory.py --model base           # the full base model (~850 MiB)
    python benchmarks/teacher_load_memory.py --checkpoint x.pth --size giant --modes new-bf16
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models.beit3 import (  # noqa: E402
    BEiT3Config,
    BEiT3Retrieval,
    load_beit3_weights,
    load_official_state_dict,
    read_checkpoint,
    resolve_config,
    save_official_checkpoint,
    write_config_json,
)

MODELS = {
    "small": lambda: BEiT3Config(embed_dim=384, heads=6, ffn_dim=1536, layers=6, img_size=224),
    "base6": lambda: replace(resolve_config("base", img_size=384), layers=6),
    "base": lambda: resolve_config("base", img_size=384),
    "giant": lambda: resolve_config("giant", img_size=384),
}
MODES = ("old", "new", "new-bf16")


def write_random_checkpoint(cfg: BEiT3Config, path: Path, device: str = "cpu", seed: int = 0) -> int:
    """An official-layout float32 checkpoint of random weights at `path`; returns its size in bytes."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = BEiT3Retrieval(cfg)
    model = model.to_empty(device=device)
    with torch.no_grad():
        # normal_ rather than init_weights' truncated normal, which takes minutes for 100M weights on a CPU;
        # neither speed nor memory depends on the values.
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    save_official_checkpoint(model, path)
    del model
    return path.stat().st_size


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _load_old_way(path: Path, cfg: BEiT3Config) -> BEiT3Retrieval:
    """How the teacher loaded before: the whole file in memory, then copied into a float32 model."""
    state = read_checkpoint(path)
    with torch.device("meta"):
        model = BEiT3Retrieval(cfg)
    model = model.to_empty(device="cpu")
    load_official_state_dict(model, state, source=str(path))
    del state
    return model.float().eval()


def _load(mode: str, path: Path, cfg: BEiT3Config) -> BEiT3Retrieval:
    if mode == "old":
        return _load_old_way(path, cfg)
    return load_beit3_weights(path, cfg, torch.bfloat16 if mode == "new-bf16" else torch.float32)[0]


def child(modes: list[str], path: Path, config: Path) -> list[dict]:
    """Load once per mode in this process, one after the other; the peak RSS each load adds, in bytes."""
    cfg = resolve_config(str(config))
    # The first load of any size pulls in torch's lazily imported modules (the meta-device kernels: about
    # 150 MB and seconds); a tiny load first keeps that fixed cost out of the figure, which should scale.
    with tempfile.TemporaryDirectory(prefix="dsmd-load-warm-") as tmp:
        tiny = BEiT3Config(embed_dim=32, heads=2, ffn_dim=64, layers=1, img_size=32, vocab_size=64)
        write_random_checkpoint(tiny, Path(tmp) / "tiny.pth")
        for mode in modes:
            _load(mode, Path(tmp) / "tiny.pth", tiny)
    rows = []
    _give_back_freed()
    for mode in modes:
        exact = _reset_peak()
        baseline = _status("VmRSS") if exact else _status("VmHWM")
        started = time.perf_counter()
        model = _load(mode, path, cfg)
        seconds = time.perf_counter() - started
        peak = _status("VmHWM")
        rows.append({
            "mode": mode,
            "peak_rss_bytes": peak,
            "baseline_rss_bytes": baseline,
            "load_peak_bytes": peak - baseline,
            "peak_reset": exact,
            "seconds": round(seconds, 3),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        })
        del model
        _give_back_freed()
    return rows


def _give_back_freed() -> None:
    """Return freed heap memory to the system before the next load: glibc keeps large freed blocks in its
    heap (its mmap threshold rises after such frees), and a later load reusing them would look smaller."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the caller measures each mode in its own process instead
        pass


def measure(path: Path, config: Path, modes=MODES, timeout: float = 900, separate: bool = False) -> list[dict]:
    """Peak RSS per mode in a fresh process (one torch thread, this tree first on the path); ratio = load peak
    over the file's size. separate: one process per mode (else one for all, which saves the imports)."""
    size = path.stat().st_size
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    rows = []
    for group in ([[m] for m in modes] if separate else [list(modes)]):
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", *group, "--checkpoint", str(path),
             "--config", str(config)],
            capture_output=True, text=True, env=env, timeout=timeout, check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"teacher_load_memory {group} failed: {out.stderr.strip().splitlines()[-1:]}")
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    for row in rows:
        row["checkpoint_bytes"] = size
        row["ratio"] = round(row["load_peak_bytes"] / size, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="base6")
    parser.add_argument("--checkpoint", type=Path, help="an existing official-layout file (else a random one)")
    parser.add_argument("--size", help="teacher.size of --checkpoint: base | large | giant | a JSON config")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--separate", action="store_true", help="one process per mode (default: one for all)")
    parser.add_argument("--child", nargs="+", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)
        print(json.dumps(child(args.child, args.checkpoint, args.config)))
        return

    with tempfile.TemporaryDirectory(prefix="dsmd-load-mem-") as tmp:
        cfg = resolve_config(args.size) if args.checkpoint else MODELS[args.model]()
        config = Path(tmp) / "config.json"
        write_config_json(cfg, config)
        path = args.checkpoint
        if path is None:
            path = Path(tmp) / "checkpoint.pth"
            write_random_checkpoint(cfg, path)
        rows = measure(path, config, args.modes, separate=args.separate)
    mib = 2**20
    print(f"checkpoint {rows[0]['checkpoint_bytes'] / mib:.0f} MiB ({rows[0]['parameters'] / 1e6:.0f}M parameters, "
          "float32); peak RSS added by loading:")
    for row in rows:
        print(f"  {row['mode']:<9} -> {row['dtype']:<9} {row['load_peak_bytes'] / mib:8.0f} MiB = {row['ratio']:.2f} x "
              f"the file, {row['seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
