"""The non-finite guard: a run stops at the first bad number, names where it came from, and never saves it.

Three checks, each where it costs least:
- teacher rows, in the collate function (inside the loader workers, on the host copy the store returns): every
  row finite and of unit norm within ``ROW_NORM_TOLERANCE``, since the store holds L2-normalised features.
  A bad row is carried in the batch and reported by the trainer before the step uses it.
- the step's losses and the gradient norm, once per optimiser step, before the optimiser applies anything,
  in one host sync (the step syncs for its log anyway).
- checkpoints: never written with a non-finite weight, and refused when resuming from one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from pipeline.errors import DsmdError

__all__ = [
    "ROW_NORM_TOLERANCE",
    "NonFiniteError",
    "bad_teacher_rows",
    "describe_rows",
    "grad_norm",
    "nonfinite_tensors",
]

# Rows are stored in float16 by default: a unit vector of a few thousand dims rounds to a norm within ~1e-3.
ROW_NORM_TOLERANCE = 1e-2


class NonFiniteError(DsmdError):
    """Training met a NaN or infinity; the message names the step and the batch."""


def bad_teacher_rows(rows: np.ndarray, ids: np.ndarray, tolerance: float = ROW_NORM_TOLERANCE) -> list[int]:
    """The ids of the rows that are not finite or not of unit norm."""
    rows = np.asarray(rows, dtype=np.float32)
    finite = np.isfinite(rows).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        unit = np.abs(np.sqrt(np.einsum("ij,ij->i", rows, rows)) - 1.0) <= tolerance
    return [int(i) for i in np.asarray(ids)[~(finite & unit)]]


def describe_rows(named: Mapping[str, Iterable[int]]) -> tuple[str, ...]:
    """('<array> rows 3, 17', ...) for the arrays with bad rows, for the batch to carry."""
    return tuple(
        f"{name} rows {', '.join(map(str, ids))}" for name, ids in named.items() if list(ids)
    )


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, on their device (no host sync): NaN or inf if any element is."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold a NaN or infinity."""
    return [
        name
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
