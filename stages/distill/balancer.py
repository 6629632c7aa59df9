"""Dynamic self-adaptive loss balancer (METHOD.md, 5a-5c).

total = sum_m w_m * a_m * L_m over the M enabled losses, w and a detached:
- magnitude a_m = max_n Lbar_n / Lbar_m, so every a_m * L_m has the same size;
- rate r_m(t) = Lbar_m(t-1) / Lbar_m(t-2), r_m = 1 for the first two periods;
- weight w_m = M * softmax(r / T)_m.
Lbar_m(t) is the mean RAW loss m over update period t (an epoch, or N optimiser steps).

Decisions of ours (METHOD.md leaves them open):
- The magnitudes of period t come from the last completed period's means Lbar(t-1). During the very first
  period no such mean exists, so a comes from the running mean of the current period including the current
  batch (detached): the first batch is balanced by its own values, later ones by an ever smoother estimate.
  Under DDP that running mean is each rank's own; completed periods are averaged over all ranks.
- A mean of 0 or less (e.g. CD before its queue holds anything, HND with nothing left to separate) gives no
  sensible ratio: such a loss keeps a_m = 1, and a rate with such a denominator is 1.
- rate_on="scaled" reproduces the official code, which takes the rates of the scaled losses a_m * Lbar_m. Those
  are max_n Lbar_n for every m by construction, so all rates are equal and every w_m is 1: its DWA part does
  nothing. "raw" (the default) follows METHOD.md.
- Disabled: total = plain sum (w = a = 1); period means are still kept for logging.

The caller runs ``balancer(losses)`` on every training batch, ``end_step()`` after each optimiser step and
``end_epoch()`` after each epoch; the configured period decides which of the two closes a period.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from pipeline.config import BalancerConfig
from pipeline.errors import ConfigError

__all__ = ["DynamicBalancer", "parse_period"]

_EPS = 1e-12


def parse_period(period: str | int) -> int | None:
    """None for "epoch", else the positive number of optimiser steps per period."""
    text = str(period).strip().lower()
    if text == "epoch":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ConfigError(
        f"distill.balancer.period must be 'epoch' or a positive number of steps (e.g. '500'), got {period!r}"
    )


def _magnitudes(means: Sequence[float]) -> list[float]:
    largest = max(means)
    return [largest / m if m > _EPS else 1.0 for m in means]


def _softmax_weights(rates: Sequence[float], temperature: float) -> list[float]:
    scaled = [r / temperature for r in rates]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [len(rates) * e / total for e in exps]


class DynamicBalancer:
    """Combines the enabled losses into one; see the module docstring for the rule and our decisions."""

    def __init__(
        self,
        names: Sequence[str],
        enabled: bool = True,
        temperature: float = 1.0,
        period: str | int = "epoch",
        rate_on: str = "raw",
    ):
        if not names:
            raise ConfigError("the balancer needs at least one loss")
        if len(set(names)) != len(names):
            raise ConfigError(f"loss names must be unique, got {list(names)}")
        if temperature <= 0:
            raise ConfigError(f"distill.balancer.temperature must be positive, got {temperature}")
        if rate_on not in ("raw", "scaled"):
            raise ConfigError(f"distill.balancer.rate_on must be 'raw' or 'scaled', got {rate_on!r}")
        self.names = list(names)
        self.enabled = enabled
        self.temperature = float(temperature)
        self.period_steps = parse_period(period)
        self.rate_on = rate_on
        m = len(self.names)
        # Completed periods and the means of the last two (oldest first).
        self.periods_done = 0
        self.history: list[list[float]] = []
        self.rates_now = [1.0] * m
        self.weights_now = [1.0] * m
        self._steps_in_period = 0
        # Running sums of the current period, a detached device tensor (no host sync per batch).
        self._sums: torch.Tensor | None = None
        self._count = 0
        self._last_magnitudes: torch.Tensor | list[float] = [1.0] * m

    @classmethod
    def from_config(cls, names: Sequence[str], cfg: BalancerConfig) -> DynamicBalancer:
        return cls(names, cfg.enabled, cfg.temperature, cfg.period, cfg.rate_on)

    # -- per batch -----------------------------------------------------------------------------------------

    def __call__(self, losses: Mapping[str, torch.Tensor], record: bool = True) -> torch.Tensor:
        """Total loss of one batch; ``record`` adds the raw values to the current period's means."""
        missing = [name for name in self.names if name not in losses]
        if missing:
            raise ConfigError(f"balancer expected losses {self.names}, missing {missing}")
        stacked = torch.stack([losses[name].float().reshape(()) for name in self.names])
        raw = stacked.detach()
        if record:
            if self._sums is None:
                self._sums = torch.zeros_like(raw)
            elif self._sums.device != raw.device:
                self._sums = self._sums.to(raw.device)
            self._sums = self._sums + raw
            self._count += 1
        if not self.enabled:
            return stacked.sum()
        magnitudes = self._current_magnitudes(raw)
        self._last_magnitudes = magnitudes
        weights = torch.tensor(self.weights_now, dtype=stacked.dtype, device=stacked.device)
        return (weights * magnitudes * stacked).sum()

    def _current_magnitudes(self, raw: torch.Tensor) -> torch.Tensor:
        if self.history:
            values = _magnitudes(self.history[-1])
            return torch.tensor(values, dtype=raw.dtype, device=raw.device)
        # First period: running mean of this period so far (this batch included when recorded).
        means = self._sums / self._count if self._count else raw
        largest = means.max()
        positive = means > _EPS
        return torch.where(positive, largest / torch.where(positive, means, torch.ones_like(means)), 1.0)

    # -- period bookkeeping ------------------------------------------------------------------------------

    def end_step(self) -> bool:
        """Call after every optimiser step; True when this closed a period (period = N steps)."""
        if self.period_steps is None:
            return False
        self._steps_in_period += 1
        if self._steps_in_period < self.period_steps:
            return False
        return self._close_period()

    def end_epoch(self) -> bool:
        """Call after every epoch; True when this closed a period (period = epoch)."""
        if self.period_steps is not None:
            return False
        return self._close_period()

    def _close_period(self) -> bool:
        self._steps_in_period = 0
        if self._sums is None:
            return False
        sums, count = self._sums, torch.tensor(float(self._count), device=self._sums.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank must use the same weights: average the period over all ranks.
            sums, count = sums.clone(), count.clone()
            dist.all_reduce(sums)
            dist.all_reduce(count)
        if float(count) == 0:
            return False
        means = [float(v) for v in (sums / count).cpu()]
        self.history = (self.history + [means])[-2:]
        self.periods_done += 1
        self._sums = None
        self._count = 0
        self._update_weights()
        return True

    def _update_weights(self) -> None:
        if len(self.history) < 2:
            self.rates_now = [1.0] * len(self.names)
            self.weights_now = [1.0] * len(self.names)
            return
        before, last = self.history
        if self.rate_on == "scaled":
            # a_m * Lbar_m = max_n Lbar_n for every m: the same rate for all losses.
            rate = max(last) / max(before) if max(before) > _EPS else 1.0
            self.rates_now = [rate] * len(self.names)
        else:
            self.rates_now = [now / old if old > _EPS else 1.0 for now, old in zip(last, before, strict=True)]
        self.weights_now = _softmax_weights(self.rates_now, self.temperature)

    # -- what to log -------------------------------------------------------------------------------------

    @property
    def weights(self) -> dict[str, float]:
        """w_m used by the current period (all 1 when disabled)."""
        values = self.weights_now if self.enabled else [1.0] * len(self.names)
        return dict(zip(self.names, values, strict=True))

    @property
    def magnitudes(self) -> dict[str, float]:
        """a_m used by the last batch (all 1 when disabled)."""
        values = self._last_magnitudes if self.enabled else [1.0] * len(self.names)
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        return dict(zip(self.names, values, strict=True))

    @property
    def rates(self) -> dict[str, float]:
        return dict(zip(self.names, self.rates_now, strict=True))

    def log_values(self) -> dict[str, float]:
        out = {f"balancer/w_{k}": v for k, v in self.weights.items()}
        out.update({f"balancer/a_{k}": v for k, v in self.magnitudes.items()})
        out.update({f"balancer/r_{k}": v for k, v in self.rates.items()})
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain Python values (loads with torch.load(weights_only=True) and JSON alike)."""
        return {
            "names": list(self.names),
            "periods_done": self.periods_done,
            "history": [list(h) for h in self.history],
            "rates": list(self.rates_now),
            "weights": list(self.weights_now),
            "steps_in_period": self._steps_in_period,
            "sums": None if self._sums is None else [float(v) for v in self._sums.cpu()],
            "count": self._count,
            "last_magnitudes": (
                self._last_magnitudes.tolist()
                if isinstance(self._last_magnitudes, torch.Tensor)
                else list(self._last_magnitudes)
            ),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if list(state["names"]) != self.names:
            raise ConfigError(
                f"checkpointed balancer combines losses {list(state['names'])} but this run enables "
                f"{self.names}; resume with the same distill.losses switches"
            )
        self.periods_done = int(state["periods_done"])
        self.history = [[float(v) for v in h] for h in state["history"]]
        self.rates_now = [float(v) for v in state["rates"]]
        self.weights_now = [float(v) for v in state["weights"]]
        self._steps_in_period = int(state["steps_in_period"])
        self._sums = None if state["sums"] is None else torch.tensor(state["sums"], dtype=torch.float32)
        self._count = int(state["count"])
        self._last_magnitudes = [float(v) for v in state["last_magnitudes"]]
