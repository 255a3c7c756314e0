"""The lookup cache on its own: freshness, the stale window, the bound, single-flight misses,
flushes; and the bounded memo the hot path keeps serialized records in."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from edge_router.cache import BoundedMemo, CacheState, LookupCache
from tests.support.dht import ManualClock


def cache(clock: ManualClock, *, maxsize: int = 8) -> LookupCache[str]:
    return LookupCache(ttl=10.0, stale=30.0, maxsize=maxsize, clock=clock)


def fetcher(value: str, reads: list[str]) -> Callable[[], Awaitable[str]]:
    async def fetch() -> str:
        reads.append(value)
        return value

    return fetch


async def test_fresh_then_stale_on_error_then_gone() -> None:
    clock = ManualClock(0.0)
    lookups = cache(clock)
    reads: list[str] = []

    async def failing() -> str:
        raise OSError("backend down")

    assert await lookups.get(("svc", "a"), fetcher("v1", reads)) == ("v1", CacheState.MISS, 0.0)
    clock.advance(9.0)
    assert await lookups.get(("svc", "a"), fetcher("v2", reads)) == ("v1", CacheState.HIT, 9.0)
    assert lookups.peek(("svc", "a")) is not None
    clock.advance(1.0)  # no longer fresh: read again, or stale when the read fails
    assert lookups.peek(("svc", "a")) is None
    assert await lookups.get(("svc", "a"), failing) == ("v1", CacheState.STALE, 10.0)
    clock.advance(29.9)
    assert (await lookups.get(("svc", "a"), failing))[1] is CacheState.STALE
    clock.advance(0.2)  # past ttl + stale: nothing left to serve
    with pytest.raises(OSError, match="backend down"):
        await lookups.get(("svc", "a"), failing)
    assert reads == ["v1"]
    assert (lookups.stats.hits, lookups.stats.misses, lookups.stats.stale) == (1, 1, 2)


async def test_the_bound_drops_the_least_recently_used() -> None:
    clock = ManualClock(0.0)
    lookups = cache(clock, maxsize=3)
    reads: list[str] = []
    for name in ("a", "b", "c"):
        await lookups.get(("svc", name), fetcher(name, reads))
    await lookups.get(("svc", "a"), fetcher("a2", reads))  # a hit: "a" is now the most recent
    await lookups.get(("svc", "d"), fetcher("d", reads))  # over the bound: "b" goes
    assert len(lookups) == 3
    assert lookups.peek(("svc", "b")) is None
    assert all(lookups.peek(("svc", name)) is not None for name in ("a", "c", "d"))
    # A flood of new keys pushes out only what is not asked for meanwhile.
    for i in range(10):
        await lookups.get(("svc", "a"), fetcher("a3", reads))
        await lookups.get(("svc", f"flood-{i}"), fetcher("x", reads))
    assert lookups.peek(("svc", "a")) is not None
    assert len(lookups) == 3
    assert reads.count("a") == 1
    assert "a2" not in reads
    assert "a3" not in reads


async def test_concurrent_misses_share_one_read_and_a_refresh_replaces_the_entry() -> None:
    clock = ManualClock(0.0)
    lookups = cache(clock)
    started, release = asyncio.Event(), asyncio.Event()
    reads = 0

    async def slow() -> str:
        nonlocal reads
        reads += 1
        started.set()
        await release.wait()
        return f"v{reads}"

    first = asyncio.create_task(lookups.get(("svc", "a"), slow))
    await started.wait()
    second = asyncio.create_task(lookups.get(("svc", "a"), slow))
    release.set()
    assert [answer[0] for answer in await asyncio.gather(first, second)] == ["v1", "v1"]
    assert reads == 1
    clock.advance(11.0)
    assert (await lookups.get(("svc", "a"), slow))[:2] == ("v2", CacheState.MISS)

    async def failing() -> str:
        raise OSError("backend down")

    clock.advance(35.0)  # 35 s after the refresh: within its stale window, not the first's
    assert await lookups.get(("svc", "a"), failing) == ("v2", CacheState.STALE, 35.0)


async def test_flush_by_prefix_and_all() -> None:
    clock = ManualClock(0.0)
    lookups = cache(clock)
    reads: list[str] = []
    for key in (("svc", "a", ""), ("svc", "a", "de"), ("svc", "b", ""), ("peers", "")):
        await lookups.get(key, fetcher("v", reads))
    assert lookups.flush(("svc", "a")) == 2
    assert lookups.peek(("svc", "b", "")) is not None
    assert lookups.flush() == 2
    assert len(lookups) == 0
    assert lookups.stats.flushes == 2


def test_bounded_memo_forgets_the_oldest_stored_first() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(3)
    for i, key in enumerate("abc"):
        memo[key] = i
    memo["a"] = 10  # replacing a value takes no room
    assert len(memo) == 3
    assert memo.get("a") == 10
    memo["d"] = 3
    assert len(memo) == 3
    assert memo.get("a") is None  # stored first, so forgotten first
    assert [memo.get(key) for key in "bcd"] == [1, 2, 3]
