"""The run's logs, written by rank 0: ``train_log.csv`` (per optimiser step: every loss, the balancer's weights,
magnitudes and rates, the learning rate, the throughput), ``val_log.csv`` (Recall@K per epoch) and, when
distill.tensorboard is on, the train rows as TensorBoard scalars."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import DsmdError
from stages.distill.balancer import DynamicBalancer
from stages.distill.context import RunContext
from stages.distill.resume import Progress


class CsvLog:
    """Append-only CSV. On resume the rows the checkpoint does not cover (``keep`` is False for them) are
    dropped, so the resumed run logs none of them twice; a fresh run (keep None) starts an empty file."""

    def __init__(self, path: Path, columns: list[str], keep: Callable[[dict], bool] | None):
        self.path, self.columns = path, columns
        rows = []
        if keep is not None and path.exists():
            with path.open() as handle:
                rows = [row for row in csv.DictReader(handle) if keep(row)]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.columns, extrasaction="ignore").writerow(row)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DsmdError(
            "distill.tensorboard is on but the tensorboard package is missing: pip install tensorboard"
        ) from None
    return SummaryWriter(str(out / "tensorboard"))


class RunLogs:
    """Every rank holds one; only rank 0's writes anything."""

    def __init__(self, ctx: RunContext, value_names: list[str], loss_names: list[str], progress: Progress,
                 resumed: bool):
        dc, out = ctx.cfg.distill, ctx.out
        self.train = self.val = self.tensorboard = None
        if not ctx.ranks.is_main:
            return
        balancer_columns = [f"{p}_{n}" for p in ("w", "a", "r") for n in loss_names]
        # Train rows are keyed by step, validation rows by completed epoch (a checkpoint taken at the last step
        # of an epoch precedes that epoch's validation, which the resumed run does again).
        step, epoch = progress.step, progress.epoch
        self.train = CsvLog(
            out / "train_log.csv",
            ["step", "epoch", "lr", *value_names, *balancer_columns, "samples_per_s"],
            (lambda row: int(row["step"]) <= step) if resumed else None,
        )
        self.val = CsvLog(
            out / "val_log.csv",
            ["step", "epoch", *[f"{d}_r{k}" for d in ("i2t", "t2i") for k in dc.val_ks], "rsum"],
            (lambda row: int(row["epoch"]) <= epoch) if resumed else None,
        )
        self.tensorboard = _tensorboard(out) if dc.tensorboard else None

    def step(self, progress: Progress, lr: float, means: dict[str, float], balancer: DynamicBalancer,
             rate: float) -> None:
        if self.train is None:
            return
        row = {"step": progress.step, "epoch": progress.epoch, "lr": lr, **means}
        row.update({f"w_{n}": v for n, v in balancer.weights.items()})
        row.update({f"a_{n}": v for n, v in balancer.magnitudes.items()})
        row.update({f"r_{n}": v for n, v in balancer.rates.items()})
        row["samples_per_s"] = rate
        self.train.write(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, progress.step)

    def validation(self, progress: Progress, metrics: dict[str, float]) -> None:
        if self.val is not None:
            self.val.write({"step": progress.step, "epoch": progress.epoch, **metrics})
