"""Training checkpoints: everything needed to continue a run exactly, saved atomically, loaded safely.

A checkpoint holds the model, optimiser, scheduler, queues, balancer, RNG states and the position in the
epoch. It is written to a temporary file and renamed, so a kill during the write leaves the previous
checkpoint intact. Loading uses weights_only=True: a checkpoint is data, never code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from pipeline.atomic import disk_full_error
from pipeline.errors import DsmdError
from store.fsutil import is_disk_full

LAST = "last.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically. A failed write (a full disk above all) removes the temporary file and leaves the
    previous checkpoint as it was, so the rerun resumes from it once space is freed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_failed(path, exc, "training resumes from the previous checkpoint") from None


def write_failed(path: Path, exc: BaseException, kept: str) -> DsmdError:
    """One line for a failed write: a full disk said plainly (torch's own writer reports it only as "file
    write failed"), anything else with its reason."""
    if is_disk_full(exc) or "write failed" in str(exc):
        return disk_full_error(path, kept)
    return DsmdError(f"could not write {path} ({type(exc).__name__}: {exc}); {kept}")


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DsmdError(f"{path}: no checkpoint to resume from; start without --resume") from None
    except Exception as exc:
        raise DsmdError(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); delete it to start over"
        ) from None
