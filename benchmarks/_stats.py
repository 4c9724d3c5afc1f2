"""Summaries of repeated runs: the median, with the smallest and largest next to it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MIB", "Spread", "rate"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no runs to summarise")
        return cls(statistics.median(values), min(values), max(values))

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max}


def rate(amount: float, seconds: Sequence[float]) -> Spread:
    """``amount`` per second for each run's time (the slowest run gives the minimum)."""
    return Spread.of([amount / s for s in seconds])
