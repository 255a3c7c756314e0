"""Lookups running at once read Redis together: one round trip (one EVALSHA) for the pages every
waiting lookup asked for, each answer and each error back to its own caller, batches bounded.

The round trips are counted by Redis itself (`INFO commandstats`), on a real redis-server; the
batcher's own rules (errors, cancelled callers, bounds) are checked with a stand-in `send`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from dht_bridge.errors import RegistryError, RegistryUnavailable
from dht_bridge.registry.batch import ReadBatcher
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from tests.support.helpers import POLICY, make_record, wait_for
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer

WAIT = 5.0


async def _evalsha_calls(registry: Registry) -> int:
    stats = await registry.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def _warm(registry: Registry) -> None:
    """Load the lookup script (its first EVALSHA fails and is sent again), then zero the stats."""
    await registry.lookup("warm")
    await registry.client.config_resetstat()


async def _fill(registry: Registry, services: Sequence[str], per: int = 3) -> dict[str, set[str]]:
    now = time.time()
    ids: dict[str, set[str]] = {}
    for service in services:
        for i in range(per):
            record = make_record(services=[service], now=now, ttl=600, load=i / 10)
            assert await registry.upsert(record)
            ids.setdefault(service, set()).add(record.worker_id)
    return ids


async def test_lookups_of_different_services_share_one_round_trip(registry: Registry) -> None:
    services = [f"svc{i}" for i in range(20)]
    ids = await _fill(registry, services)
    await _warm(registry)

    found = await asyncio.gather(*(registry.lookup(service) for service in services))

    assert await _evalsha_calls(registry) == 1
    for service, records in zip(services, found, strict=True):
        assert {record.worker_id for record in records} == ids[service]
        assert [record.load for record in records] == [0.0, 0.1, 0.2]


async def test_batched_lookups_on_every_topology(topology_registry: Registry) -> None:
    """One Redis, Sentinel and Cluster (where a batch's keys share the registry's slot)."""
    services = [f"svc{i}" for i in range(6)]
    ids = await _fill(topology_registry, services, per=2)
    await topology_registry.client.set(topology_registry.service_key("bad"), "not a set")
    found = await asyncio.gather(
        *(topology_registry.lookup(service) for service in [*services, "bad", "none"]),
        return_exceptions=True,
    )
    for service, answer in zip(services, found, strict=False):
        assert not isinstance(answer, BaseException)
        assert {record.worker_id for record in answer} == ids[service]
    assert isinstance(found[-2], RegistryError)
    assert found[-1] == []


async def test_one_lookup_alone_is_still_one_round_trip(registry: Registry) -> None:
    ids = await _fill(registry, ["ocr"])
    await _warm(registry)
    found = await registry.lookup("ocr")
    assert {record.worker_id for record in found} == ids["ocr"]
    assert await _evalsha_calls(registry) == 1


async def test_lookups_of_one_page_read_it_once(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups of one service in several regions read the same page: it is read once, and its
    records sorted out once."""
    now = time.time()
    for i, region in enumerate(["eu", "us", "ap"]):
        await registry.upsert(make_record(services=["ocr"], now=now, region=region, load=i / 10))
    await _warm(registry)
    regions = ["eu", "us", "ap", "eu", "sa"]
    sorted_out: list[str] = []
    usable = Registry._usable

    def counting(self: Registry, service: str, *args: Any, **kwargs: Any) -> Any:
        sorted_out.append(service)
        return usable(self, service, *args, **kwargs)

    monkeypatch.setattr(Registry, "_usable", counting)

    found = await asyncio.gather(*(registry.lookup("ocr", region=r) for r in regions))

    assert await _evalsha_calls(registry) == 1
    assert sorted_out == ["ocr"]
    for region, records in zip(regions, found, strict=True):
        assert len(records) == 3
        # Each caller's own region ranking, from the shared page.
        expected = region if region != "sa" else "eu"  # no provider in sa: load order
        assert records[0].region == expected


async def test_a_failed_read_fails_its_own_lookup_only(registry: Registry) -> None:
    services = ["ocr", "gpu", "asr"]
    ids = await _fill(registry, services)
    # A service set that is not a sorted set: ZRANGE on it fails with WRONGTYPE.
    await registry.client.set(registry.service_key("bad"), "not a set")
    await _warm(registry)

    found = await asyncio.gather(
        *(registry.lookup(service) for service in ["ocr", "bad", "gpu", "asr"]),
        return_exceptions=True,
    )

    assert await _evalsha_calls(registry) == 1
    ocr, bad, gpu, asr = found
    assert isinstance(bad, RegistryError)
    assert not isinstance(bad, RegistryUnavailable)
    assert "WRONGTYPE" in str(bad)
    for service, answer in zip(services, [ocr, gpu, asr], strict=True):
        assert not isinstance(answer, BaseException)
        assert {record.worker_id for record in answer} == ids[service]


async def test_a_batch_is_bounded(redis_url: str) -> None:
    client = open_registry(
        RegistrySettings(redis_url=redis_url, timeout=TEST_REDIS_TIMEOUT), policy=POLICY
    ).client
    registry = Registry(client, policy=POLICY, lookup_batch=4, owns_client=True)
    try:
        services = [f"svc{i}" for i in range(10)]
        ids = await _fill(registry, services, per=1)
        await _warm(registry)

        found = await asyncio.gather(*(registry.lookup(service) for service in services))

        assert await _evalsha_calls(registry) == 3  # 4 + 4 + 2
        for service, records in zip(services, found, strict=True):
            assert {record.worker_id for record in records} == ids[service]
    finally:
        await registry.aclose()


@asynccontextmanager
async def _private(
    make_redis_server: Callable[[], RedisServer],
) -> AsyncIterator[tuple[RedisServer, Registry]]:
    """A private server for a fault test (0.5 s timeout), with providers of ocr and gpu."""
    server = make_redis_server()
    registry = open_registry(RegistrySettings(redis_url=server.url, timeout=0.5), policy=POLICY)
    try:
        await _fill(registry, ["ocr", "gpu"])
        yield server, registry
    finally:
        await registry.aclose()


async def test_redis_down_fails_every_lookup_of_the_batch_as_unavailable(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    async with _private(make_redis_server) as (server, registry):
        server.kill()
        found = await asyncio.gather(
            *(registry.lookup(service) for service in ["ocr", "gpu", "ocr", "asr"]),
            return_exceptions=True,
        )
        assert all(isinstance(answer, RegistryUnavailable) for answer in found), found


async def test_a_paused_redis_fails_the_batch_within_the_timeout(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    async with _private(make_redis_server) as (server, registry):
        await registry.lookup("ocr")  # the script is loaded, a connection is in the pool
        server.pause()
        try:
            started = time.monotonic()
            found = await asyncio.gather(
                *(registry.lookup(service) for service in ["ocr", "gpu"]), return_exceptions=True
            )
            assert time.monotonic() - started < WAIT
        finally:
            server.resume()
        assert all(isinstance(answer, RegistryUnavailable) for answer in found), found
        assert len(await registry.lookup("ocr")) == 3  # and the next batch reads again


# -- the batcher's own rules, with a stand-in for Redis ------------------------------------


class Backend:
    """A `send` that records its batches, answers `read * 10`, fails reads below zero alone
    (and a whole batch holding 13), and waits for `gate` when it is not set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, reads: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(reads))
        await self.gate.wait()
        if 13 in reads:
            raise ConnectionError("the whole batch failed")
        return [ValueError(f"bad read {r}") if r < 0 else r * 10 for r in reads]


async def test_reads_of_one_turn_go_in_one_batch_and_repeats_are_sent_once() -> None:
    backend = Backend()
    batcher = ReadBatcher[int, int](backend.send, max_reads=8, timeout=WAIT)
    answers = await asyncio.gather(*(batcher.read(r) for r in [1, 2, 3, 2, 1]))
    assert answers == [10, 20, 30, 20, 10]
    assert backend.batches == [[1, 2, 3]]


async def test_each_read_gets_its_own_error() -> None:
    backend = Backend()
    batcher = ReadBatcher[int, int](backend.send, max_reads=8, timeout=WAIT)
    answers = await asyncio.gather(*(batcher.read(r) for r in [1, -1, 2]), return_exceptions=True)
    assert answers[0] == 10
    assert answers[2] == 20
    assert isinstance(answers[1], ValueError)
    failed = await asyncio.gather(*(batcher.read(r) for r in [1, 13]), return_exceptions=True)
    assert all(isinstance(answer, ConnectionError) for answer in failed)
    assert len(backend.batches) == 2


async def test_batches_hold_at_most_max_reads() -> None:
    backend = Backend()
    batcher = ReadBatcher[int, int](backend.send, max_reads=3, timeout=WAIT)
    answers = await asyncio.gather(*(batcher.read(r) for r in [1, 2, 3, 1, 4, 5, 6, 7]))
    assert answers == [10, 20, 30, 10, 40, 50, 60, 70]
    assert backend.batches == [[1, 2, 3], [4, 5, 6], [7]]


async def test_a_caller_giving_up_leaves_the_others_their_answers() -> None:
    backend = Backend()
    backend.gate.clear()
    batcher = ReadBatcher[int, int](backend.send, max_reads=8, timeout=WAIT)
    quitter = asyncio.ensure_future(batcher.read(1))
    stayers = [asyncio.ensure_future(batcher.read(r)) for r in [1, 2]]
    await wait_for(lambda: len(backend.batches) == 1, timeout=WAIT, message="the batch sent")
    quitter.cancel()
    backend.gate.set()
    assert await asyncio.gather(*stayers) == [10, 20]
    assert quitter.cancelled()


async def test_a_batch_that_outlasts_the_timeout_fails_its_reads() -> None:
    backend = Backend()
    backend.gate.clear()
    batcher = ReadBatcher[int, int](backend.send, max_reads=8, timeout=0.05)
    with pytest.raises(TimeoutError):
        await batcher.read(1)
    backend.gate.set()
    assert await batcher.read(2) == 20


def test_max_reads_must_be_positive() -> None:
    async def send(reads: Sequence[int]) -> list[int | Exception]:
        return list(reads)

    with pytest.raises(ValueError, match="max_reads"):
        ReadBatcher[int, int](send, max_reads=0, timeout=1.0)
