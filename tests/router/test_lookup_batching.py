"""The router's misses on batched registry reads: concurrent misses of several regions and
services cost Redis fewer round trips than requests, each answer is its own request's, and a
Redis outage answers every one of them as a single miss is answered (503 `unavailable`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from tests.support.helpers import POLICY, make_record
from tests.support.redis_server import RedisServer
from tests.support.router import client_for, router_app

REQUESTS = [(service, region) for service in ("ocr", "gpu") for region in ("eu", "us", "ap", "")]


async def test_concurrent_misses_share_round_trips_and_get_their_own_answers(
    registry: Registry,
) -> None:
    now = time.time()
    for service in ("ocr", "gpu"):
        for i, region in enumerate(("eu", "us", "ap")):
            record = make_record(services=[service], now=now, region=region, load=i / 10)
            assert await registry.upsert(record)
    async with client_for(router_app(registry)) as client:
        await client.get("/services/warm")  # the script is loaded
        await registry.client.config_resetstat()
        answers = await asyncio.gather(
            *(client.get(f"/services/{s}", params={"region": r} if r else {}) for s, r in REQUESTS)
        )
    stats = await registry.client.info("commandstats")
    assert int(stats["cmdstat_evalsha"]["calls"]) < len(REQUESTS)
    for (service, region), answer in zip(REQUESTS, answers, strict=True):
        assert answer.status_code == 200
        assert answer.headers["x-cache"] == "MISS"
        providers = answer.json()["providers"]
        assert len(providers) == 3
        assert all(service in p["services"] for p in providers)
        assert providers[0]["region"] == (region or "eu")  # least loaded when no region


async def test_concurrent_misses_with_redis_down_are_all_503(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    registry = open_registry(RegistrySettings(redis_url=server.url, timeout=0.5), policy=POLICY)
    try:
        await registry.upsert(make_record(services=["ocr"]))
        server.kill()
        async with client_for(router_app(registry)) as client:
            answers = await asyncio.gather(
                *(client.get(f"/services/{s}", params={"region": r}) for s, r in REQUESTS)
            )
        assert {answer.status_code for answer in answers} == {503}
        assert {answer.json()["error"] for answer in answers} == {"unavailable"}
    finally:
        await registry.aclose()
