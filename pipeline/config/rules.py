"""Markers that the schema attaches to its types with typing.Annotated, and that loading checks.

``Annotated[int, Range(ge=1)]`` is an integer of at least 1; ``Annotated[list[X], Items(min=1, unique=True)]`` a
list of at least one entry, none repeated; ``Annotated[str, Pattern(...)]`` a string of a given form. Every float
must also be finite (no NaN or infinity), whatever its range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

__all__ = ["Range", "Items", "Pattern", "PosInt", "NonNegInt", "PosFloat", "NonNegFloat", "Seed"]


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: ge / gt bound it from below, le / lt from above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def __str__(self) -> str:
        low = f"{'>=' if self.ge is not None else '>'} {_num(self.ge if self.ge is not None else self.gt)}"
        high = f"{'<=' if self.le is not None else '<'} {_num(self.le if self.le is not None else self.lt)}"
        has_low = self.ge is not None or self.gt is not None
        has_high = self.le is not None or self.lt is not None
        if has_low and has_high:
            return f"{low} and {high}"
        return low if has_low else high if has_high else "any finite number"


@dataclass(frozen=True)
class Items:
    """Rules for a list as a whole: at least ``min`` entries; ``unique``: no entry twice."""

    min: int = 0
    unique: bool = False


@dataclass(frozen=True)
class Pattern:
    """A string that must match ``regex`` in full (case-insensitive, surrounding blanks ignored); ``meaning``
    says in words what is allowed."""

    regex: str
    meaning: str

    def matches(self, text: str) -> bool:
        return re.fullmatch(self.regex, text.strip(), flags=re.IGNORECASE) is not None


def _num(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# Sizes, counts of steps, epochs and batches: zero of them would run nothing (or divide by zero).
PosInt = Annotated[int, Range(ge=1)]
# Worker and thread counts, where 0 has a stated meaning (in-process, automatic).
NonNegInt = Annotated[int, Range(ge=0)]
# numpy's and torch's generators take seeds from 0 up.
Seed = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
