"""Upstream's learning-rate arithmetic (reference section 0), shared by every tuner.

The same power-of-two fraction says both how close to a limit counts as "near" and how far
to move the limit: -r 4 (default) is 25 %, each step down halves it, down to 1.5625 % at -r 0.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_RATE, MAX_RATE, DEFAULT_RATE = 0, 4, 4


class LearningRateError(ValueError):
    pass


@dataclass(frozen=True)
class LearningRate:
    rate: int = DEFAULT_RATE

    def __post_init__(self) -> None:
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise LearningRateError(f"values {MIN_RATE}-{MAX_RATE} are supported")

    @property
    def shift(self) -> int:
        return 6 - self.rate

    def step(self, value: int) -> int:
        # Upstream's step truncates to 0 for values below 2^shift, so GROW(3) == 3 and a tiny
        # limit could never grow; we always move by at least one unit.
        return max(value >> self.shift, 1)

    def grow(self, value: int) -> int:
        return value + self.step(value)

    def shrink(self, value: int) -> int:
        return max(value - self.step(value), 0)

    def nearly_full(self, value: int, limit: int) -> bool:
        return value >= limit or value + (limit >> self.shift) >= limit

    def nearly_empty(self, value: int, limit: int) -> bool:
        return value <= limit >> self.shift
