"""Retry pacing, in one place: a frozen policy (exponential with jitter, or no wait at all for
tests, as redis-py has), and the small stateful `Backoff` each retry loop owns."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Backoff", "BackoffPolicy", "ExponentialBackoff", "NoBackoff", "jittered"]


class BackoffPolicy(Protocol):
    """How long to wait before retry number `attempt` (0 for the first)."""

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before this attempt."""
        ...


@dataclass(frozen=True)
class ExponentialBackoff:
    """Ceilings grow from `base` by `factor` up to `cap`; each delay is drawn from the top
    `jitter` share under its ceiling, so that many processes that lost the same peer at the
    same moment do not come back as one burst."""

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.base <= self.cap and self.factor >= 1 and 0 <= self.jitter <= 1):
            raise ValueError("backoff needs 0 < base <= cap, factor >= 1, 0 <= jitter <= 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The ceiling of `attempt`, less up to `jitter` of it."""
        # min() before the power would overflow: attempts can run into the thousands.
        ceiling = self.cap if attempt > 64 else min(self.cap, self.base * self.factor**attempt)
        return ceiling * (1 - self.jitter * rng.random())


@dataclass(frozen=True)
class NoBackoff:
    """Retry at once: for tests, and for callers that pace themselves."""

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Always 0."""
        return 0.0


@dataclass
class Backoff:
    """One retry loop's state: the delay before the next attempt; `reset` after a success."""

    policy: BackoffPolicy = field(default_factory=ExponentialBackoff)
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next(self) -> float:
        """Seconds to wait before the next attempt, and count it."""
        delay = self.policy.delay(self.attempts, self.rng)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Start again from the first delay."""
        self.attempts = 0


def jittered(interval: float, fraction: float, rng: random.Random) -> float:
    """`interval` moved by up to `fraction` of itself either way, uniformly."""
    return interval * (1 + fraction * (2 * rng.random() - 1))
