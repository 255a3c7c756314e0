"""Continuous churn for the field bench: heavy-tailed sessions, half of the departures crashes.

Each worker other than the coordinators lives sessions whose lengths follow a Weibull (shape
0.5 by default) or log-normal law with the median `--session-median`, as measured in deployed
P2P networks (Stutzbach and Rejaie, "Understanding churn in peer-to-peer networks", 2006: Weibull
shapes of 0.34 to 0.59). Offline spells follow the same law. A departure is a crash (the host's
endpoints vanish, nothing more is sent, no tombstone) or a leave (a tombstone is published, then
the node closes), half each. A restart is what a restart from the state file does: the same
node id, address, identity and seq, joined through the peers it knew when it went down
(through the coordinators only if none of them answers, which the figures count).

The first session of each worker is drawn from the same law, which makes early departures a
little too rare (sessions under way at the start are longer on average); the window is short
beside a 30-minute median anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

__all__ = ["Churn", "ChurnCounts", "SessionModel"]

logger = logging.getLogger("field_bench")

# Weibull shape and log-normal sigma by default.
DEFAULT_WEIBULL_SHAPE = 0.5
DEFAULT_LOGNORMAL_SIGMA = 1.5


@dataclass(frozen=True)
class SessionModel:
    """Session (and offline) lengths in seconds: `dist` "weibull" or "lognormal", with
    `median` and `shape` (Weibull k, or log-normal sigma)."""

    dist: str
    median: float
    shape: float

    @classmethod
    def named(cls, dist: str, median: float) -> SessionModel:
        """The law `dist` with its default shape."""
        shape = DEFAULT_WEIBULL_SHAPE if dist == "weibull" else DEFAULT_LOGNORMAL_SIGMA
        return cls(dist, median, shape)

    def draw(self, rng: random.Random) -> float:
        """One length, in seconds."""
        if self.dist == "weibull":
            scale = self.median / math.log(2) ** (1 / self.shape)
            return rng.weibullvariate(scale, self.shape)
        return rng.lognormvariate(math.log(self.median), self.shape)

    def describe(self) -> str:
        """One line for the report."""
        what = "shape" if self.dist == "weibull" else "sigma"
        return f"{self.dist} sessions, median {self.median:g} s, {what} {self.shape:g}"


@dataclass
class ChurnCounts:
    """What churn did during the run."""

    crashes: int = 0
    leaves: int = 0
    restarts: int = 0
    restart_failures: int = 0
    restarts_via_coordinators: int = 0
    restart_seconds: list[float] = field(default_factory=list)  # listen to joined, each
    members: int = 0  # workers that churned (all but the coordinators)
    seconds: float = 0.0  # how long churn ran

    def edge_requests_per_worker_day(self) -> float:
        """A worker's requests to the edge a day: a restart whose saved peers all failed asks
        the edge for bootstrap peers (`/dht/bootstrap`, the coordinators here); one from the
        state file otherwise costs none, and heartbeats never reach the edge."""
        if not self.members or not self.seconds:
            return 0.0
        return self.restarts_via_coordinators / self.members / self.seconds * 86400


class Member(Protocol):
    """What churn needs of a worker."""

    role: str
    alive: bool
    listed: bool
    down_since: float


W = TypeVar("W", bound=Member)


class Churn(Generic[W]):
    """Runs every churning worker's sessions while open. `depart(worker, crash)` does the
    implementation's part of a departure; `restart(worker)` that of a restart, answering None
    when it failed (tried again after another offline spell) or whether it had to join
    through the coordinators; `rejoined(worker)` then publishes at once, as the agent does."""

    def __init__(
        self,
        model: SessionModel,
        *,
        depart: Callable[[W, bool], Awaitable[None]],
        restart: Callable[[W], Awaitable[bool | None]],
        rejoined: Callable[[W], Awaitable[None]],
        seed: int,
    ) -> None:
        self.model = model
        self._depart = depart
        self._restart = restart
        self._rejoined = rejoined
        self._seed = seed
        self.counts = ChurnCounts()

    @contextlib.asynccontextmanager
    async def running(self, workers: Sequence[W]) -> AsyncIterator[ChurnCounts]:
        """Churn `workers` while the block runs (coordinators never leave)."""
        loop = asyncio.get_running_loop()
        # Each worker draws from its own generator, seeded by its index, so that ours and
        # the stock run go through the same sessions.
        tasks = [
            loop.create_task(self._life(w, random.Random(f"{self._seed}:{i}")), name="churn")
            for i, w in enumerate(workers)
            if w.role != "coordinator"
        ]
        self.counts.members = len(tasks)
        started = time.monotonic()
        try:
            yield self.counts
        finally:
            self.counts.seconds += time.monotonic() - started
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Exception):
                    logger.error("a worker's churn failed", exc_info=result)

    async def _life(self, worker: W, rng: random.Random) -> None:
        while True:
            await asyncio.sleep(self.model.draw(rng))
            crash = rng.random() < 0.5
            worker.alive = False
            # Not listed again until its first publish after the restart lands: a tombstone
            # (or, after a crash, the lease) has taken its record out meanwhile.
            worker.listed = False
            worker.down_since = time.monotonic()
            await self._depart(worker, crash)
            if crash:
                self.counts.crashes += 1
            else:
                self.counts.leaves += 1
            while True:
                await asyncio.sleep(self.model.draw(rng))
                started = time.monotonic()
                via = await self._restart(worker)
                if via is not None:
                    break
                self.counts.restart_failures += 1
            self.counts.restarts += 1
            self.counts.restart_seconds.append(time.monotonic() - started)
            self.counts.restarts_via_coordinators += via
            worker.alive = True
            await self._rejoined(worker)
