"""Pearson correlation over a sliding window of samples, as upstream's corr.h does in spirit.

Upstream keeps cumulative sums since start (old samples never age out, so a change in
behaviour is noticed later and later) and keys them by tunable index alone (tuners collide).
We key by (tuner, tunable, netns) and keep the last WINDOW samples.
"""

from __future__ import annotations

import math
from collections import deque

MIN_SAMPLES = 10
THRESHOLD = 0.75
WINDOW = 32


class Correlation:
    def __init__(self, window: int = WINDOW) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, x: float, y: float) -> None:
        self.samples.append((x, y))

    def reset(self) -> None:
        self.samples.clear()

    def __len__(self) -> int:
        return len(self.samples)

    def _moments(self) -> tuple[float, float, float] | None:
        """(Σ(x-x̄)(y-ȳ), Σ(x-x̄)², Σ(y-ȳ)²), or None with fewer than MIN_SAMPLES samples."""
        n = len(self.samples)
        if n < MIN_SAMPLES:
            return None
        mean_x = sum(x for x, _ in self.samples) / n
        mean_y = sum(y for _, y in self.samples) / n
        cov = sum((x - mean_x) * (y - mean_y) for x, y in self.samples)
        var_x = sum((x - mean_x) ** 2 for x, _ in self.samples)
        var_y = sum((y - mean_y) ** 2 for _, y in self.samples)
        return cov, var_x, var_y

    def value(self) -> float:
        """Pearson r, or 0.0 with fewer than MIN_SAMPLES samples or no variance."""
        moments = self._moments()
        if moments is None or moments[1] == 0 or moments[2] == 0:
            return 0.0
        cov, var_x, var_y = moments
        return cov / math.sqrt(var_x * var_y)

    def correlated(self) -> bool:
        return self.value() > THRESHOLD

    def rise(self) -> float:
        """How much y rises across the window's range of x, on the least-squares line
        (0.0 with fewer than MIN_SAMPLES samples or no spread of x). r says how steady a
        trend is, not how big: a 0.2 % rise in lockstep with x has r = 1."""
        moments = self._moments()
        if moments is None or moments[1] == 0:
            return 0.0
        xs = [x for x, _ in self.samples]
        return moments[0] / moments[1] * (max(xs) - min(xs))


class Correlations:
    """Correlation state per key, created on first use."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, Correlation] = {}

    def __getitem__(self, key: tuple) -> Correlation:
        return self._by_key.setdefault(key, Correlation())

    def forget(self, cookie: int) -> None:
        """Drop the state of a namespace that is gone (keys end with its cookie)."""
        for key in [k for k in self._by_key if k[-1] == cookie]:
            del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)
