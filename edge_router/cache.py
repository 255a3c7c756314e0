"""The hot-lookup cache: fresh answers, stale ones kept for bad days, one backend read per miss."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cachetools import TTLCache

logger = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, ...]


class CacheState(enum.Enum):
    """How an answer was served; the value is the X-Cache header."""

    HIT = "HIT"  # fresh from the cache
    MISS = "MISS"  # read from a backend just now
    STALE = "STALE"  # the backends failed; an older answer was served


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A cached answer and when it was fetched (on the cache's clock); `derived` holds what
    callers computed from the answer (a serialized body), kept and dropped with it."""

    value: T
    fetched_at: float
    derived: dict[Hashable, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class CacheStats:
    """Counters for /metrics."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    backend_reads: int = 0
    flushes: int = 0


class LookupCache(Generic[T]):
    """A bounded TTL cache with single-flight misses and stale-if-error.

    An entry is fresh for `ttl` seconds; it is then kept `stale` seconds more, served only
    when the backend read fails. Concurrent misses for one key share one backend read.
    """

    def __init__(
        self,
        *,
        ttl: float,
        stale: float,
        maxsize: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: TTLCache[Key, Entry[T]] = TTLCache(maxsize, ttl + stale, timer=clock)
        self._inflight: dict[Key, asyncio.Future[Entry[T]]] = {}
        self.stats = CacheStats()

    async def get(self, key: Key, fetch: Callable[[], Awaitable[T]]) -> tuple[T, CacheState, float]:
        """The answer for `key`, how it was served, and its age in seconds.

        Raises what `fetch` raised when the backend fails and no stale entry is left.
        """
        entry, state, age = await self.entry(key, fetch)
        return entry.value, state, age

    async def entry(
        self, key: Key, fetch: Callable[[], Awaitable[T]]
    ) -> tuple[Entry[T], CacheState, float]:
        """`get`, with the whole entry: its `derived` memo lets a hit reuse what an earlier
        request built from the same answer."""
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry.fetched_at < self.ttl:
            self.stats.hits += 1
            return entry, CacheState.HIT, now - entry.fetched_at
        try:
            fresh = await self._fetch_once(key, fetch)
        except Exception:
            entry = self._entries.get(key)
            if entry is None:
                raise
            self.stats.stale += 1
            logger.warning(
                "backends failed for %s; serving a %.0fs old answer",
                key,
                self._clock() - entry.fetched_at,
            )
            return entry, CacheState.STALE, self._clock() - entry.fetched_at
        self.stats.misses += 1
        return fresh, CacheState.MISS, 0.0

    def peek(self, key: Key) -> tuple[Entry[T], float] | None:
        """The entry of `key` and its age while it is fresh, else None; counts nothing and
        never reads a backend (the lookup fast path calls `count_hit` when it serves it)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self._clock() - entry.fetched_at
        return (entry, age) if age < self.ttl else None

    def count_hit(self) -> None:
        """Count an answer served fresh from an entry found by `peek`."""
        self.stats.hits += 1

    async def _fetch_once(self, key: Key, fetch: Callable[[], Awaitable[T]]) -> Entry[T]:
        pending = self._inflight.get(key)
        if pending is not None:
            # Shield: one waiter giving up must not cancel the read the others wait for.
            return await asyncio.shield(pending)
        future: asyncio.Future[Entry[T]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            self.stats.backend_reads += 1
            value = await fetch()
            entry = Entry(value, self._clock())
            self._entries[key] = entry
            future.set_result(entry)
            return entry
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            # Waiters get the error; mark it retrieved so an unwaited future does not warn.
            future.exception()
            raise
        finally:
            del self._inflight[key]

    def flush(self, prefix: Key = ()) -> int:
        """Drop every entry whose key starts with `prefix` (all when empty); returns how many."""
        self.stats.flushes += 1
        if not prefix:
            count = len(self._entries)
            self._entries.clear()
            return count
        doomed = [key for key in list(self._entries.keys()) if key[: len(prefix)] == prefix]
        for key in doomed:
            self._entries.pop(key, None)
        return len(doomed)

    def __len__(self) -> int:
        return len(self._entries)
