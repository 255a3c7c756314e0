"""Retry delays as an object: exponential backoff with jitter, which tests replace or shrink."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays that grow by `factor` from `start` up to `maximum`, each spread by +-`jitter`
    (a share of the delay) so that many processes retrying one peer do not retry in step."""

    start: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    _current: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not 0 < self.start <= self.maximum or self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs 0 < start <= maximum, factor >= 1, 0 <= jitter < 1")
        self._current = self.start

    def next(self) -> float:
        """The next delay to wait, in seconds."""
        delay = self._current * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self._current = min(self._current * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        """Start again from `start` (after a success)."""
        self._current = self.start

    def copy(self) -> Backoff:
        """A fresh backoff with the same parameters (each retry loop owns one)."""
        return Backoff(self.start, self.maximum, self.factor, self.jitter, self.rng)
