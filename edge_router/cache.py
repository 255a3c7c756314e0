"""The hot-lookup cache: fresh answers, stale ones kept for bad days, one backend read per miss."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Key = tuple[str, ...]


class BoundedMemo(Generic[K, V]):
    """A memo of at most `maxsize` entries that forgets the oldest stored first.

    For what the hot path reads many times a request: a read is a plain dict's (cachetools'
    LRUCache spent about a microsecond in Python on each). No recency order, so it suits values
    that are replaced rather than reused for long (each record's JSON lives one heartbeat).
    """

    __slots__ = ("_items", "maxsize")

    def __init__(self, maxsize: int) -> None:
        # Ordered: dropping a plain dict's first key again and again scans the holes the
        # earlier drops left (1.8 us a drop at 10,000 keys, 0.2 here).
        self._items: OrderedDict[K, V] = OrderedDict()
        self.maxsize = maxsize

    def get(self, key: K) -> V | None:
        """The value kept for `key`, or None."""
        return self._items.get(key)

    def __setitem__(self, key: K, value: V) -> None:
        items = self._items
        if key not in items and len(items) >= self.maxsize:
            items.popitem(last=False)
        items[key] = value

    def __len__(self) -> int:
        return len(self._items)


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
    when the backend read fails. Concurrent misses for one key share one backend read. Past
    `maxsize` entries the least recently used goes, so a flood of new keys does not push out
    the answers being asked for.
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
        self._keep = ttl + stale
        self._maxsize = maxsize
        self._clock = clock
        # Least recently used first. Rather than cachetools' TTLCache: a miss spent about 10 us
        # in its layers of Python (bench/README.md, the miss).
        self._entries: OrderedDict[Key, Entry[T]] = OrderedDict()
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
        entry = self._used(key, now)
        if entry is not None and now - entry.fetched_at < self.ttl:
            self.stats.hits += 1
            return entry, CacheState.HIT, now - entry.fetched_at
        try:
            fresh = await self._fetch_once(key, fetch)
        except Exception:
            entry = self._used(key, self._clock())
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
        now = self._clock()
        entry = self._used(key, now)
        if entry is None:
            return None
        age = now - entry.fetched_at
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
            self._store(key, entry)
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

    def _used(self, key: Key, now: float) -> Entry[T] | None:
        """The entry of `key` unless its stale window is over (then dropped), made the most
        recently used."""
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return None
        if now - entry.fetched_at < self._keep:
            entries.move_to_end(key)
            return entry
        del entries[key]
        return None

    def _store(self, key: Key, entry: Entry[T]) -> None:
        entries = self._entries
        entries.pop(key, None)
        while entries and len(entries) >= self._maxsize:
            entries.popitem(last=False)
        entries[key] = entry

    def _purge(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if now - e.fetched_at >= self._keep]:
            del self._entries[key]

    def flush(self, prefix: Key = ()) -> int:
        """Drop every entry whose key starts with `prefix` (all when empty); returns how many."""
        self.stats.flushes += 1
        self._purge()  # what has expired is not counted as flushed
        if not prefix:
            count = len(self._entries)
            self._entries.clear()
            return count
        doomed = [key for key in self._entries if key[: len(prefix)] == prefix]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def __len__(self) -> int:
        self._purge()
        return len(self._entries)
