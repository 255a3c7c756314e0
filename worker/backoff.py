"""Retry pacing: exponential backoff with jitter, and jittered periodic intervals."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffSettings:
    """Delays grow from `base` by `factor` up to `cap`; each is drawn from its upper `jitter`."""

    base: float = 5.0
    cap: float = 300.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.base <= self.cap and self.factor >= 1 and 0 <= self.jitter <= 1):
            raise ValueError("backoff needs 0 < base <= cap, factor >= 1, 0 <= jitter <= 1")


@dataclass
class Backoff:
    """The delay before the next attempt; `reset` after a success.

    Jitter spreads the retries of many workers that lost the same peer at the same moment,
    so they do not come back as one burst.
    """

    settings: BackoffSettings = field(default_factory=BackoffSettings)
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt, and count it."""
        ceiling = min(self.settings.cap, self.settings.base * self.settings.factor**self.attempts)
        self.attempts += 1
        return ceiling * (1 - self.settings.jitter * self.rng.random())

    def reset(self) -> None:
        """Start again from `base`."""
        self.attempts = 0


def jittered(interval: float, fraction: float, rng: random.Random) -> float:
    """`interval` moved by up to `fraction` of itself either way, uniformly."""
    return interval * (1 + fraction * (2 * rng.random() - 1))
