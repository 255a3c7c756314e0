"""`GET /services` (every service with its provider count) and capability filters."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.capabilities import parse_filters, select
from edge_router.errors import BadRequest
from tests.support.helpers import POLICY, make_record
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer
from tests.support.router import ADMIN_TOKEN, client_for, router_app


async def test_the_catalog_counts_providers_per_service_and_is_cached(
    registry: Registry,
) -> None:
    for services in (["ocr"], ["ocr", "gpu"], ["asr"], ["ocr"]):
        await registry.upsert(make_record(services=services))
    async with client_for(router_app(registry)) as client:
        first = await client.get("/services")
        await registry.upsert(make_record(services=["gpu"]))
        second = await client.get("/services")
        flushed = await client.post(
            "/admin/cache/flush", json={}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        third = await client.get("/services")
    assert first.status_code == 200
    assert first.json()["services"] == [
        {"service": "ocr", "providers": 3},
        {"service": "asr", "providers": 1},
        {"service": "gpu", "providers": 1},
    ]
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.json() == {**first.json(), "source": "cache"}
    assert flushed.status_code == 200
    assert {"service": "gpu", "providers": 2} in third.json()["services"]


async def test_the_catalog_without_redis_is_a_503_not_an_empty_list(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    registry = open_registry(
        RegistrySettings(redis_url=server.url, timeout=TEST_REDIS_TIMEOUT), policy=POLICY
    )
    try:
        server.kill()
        async with client_for(router_app(registry)) as client:
            answer = await client.get("/services")
    finally:
        await registry.aclose()
    assert answer.status_code == 503
    assert answer.json()["error"]


def test_capability_filters_select_by_equality_and_at_least() -> None:
    big = make_record(capabilities={"gpu_mem": 24, "arch": "x86_64", "cuda": True})
    small = make_record(capabilities={"gpu_mem": 8, "arch": "arm64"})
    bare = make_record()
    records = [big, small, bare]
    assert select(records, parse_filters(["gpu_mem>=16"])) == [big]
    assert select(records, parse_filters(["gpu_mem>=8"])) == [big, small]
    assert select(records, parse_filters(["arch=arm64"])) == [small]
    assert select(records, parse_filters(["cuda=true", "arch=x86_64"])) == [big]
    assert select(records, parse_filters(["gpu_mem=24"])) == [big]
    assert select(records, parse_filters(["arch>=1"])) == []  # text is never "at least"
    assert select(records, parse_filters([])) == records


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (["gpu"], "key=value"),
        (["GPU=1"], "key must match"),
        (["gpu_mem>=lots"], "needs a number"),
        (["gpu_mem>=inf"], "finite"),
        ([f"k{i}=1" for i in range(9)], "at most 8"),
    ],
)
def test_a_bad_capability_filter_is_a_clear_400(raw: list[str], complaint: str) -> None:
    with pytest.raises(BadRequest, match=complaint):
        parse_filters(raw)


async def test_lookups_and_routes_filter_by_capability(registry: Registry) -> None:
    big = make_record(services=["gpu"], capabilities={"gpu_mem": 24})
    await registry.upsert(big)
    await registry.upsert(make_record(services=["gpu"], capabilities={"gpu_mem": 8}))
    async with client_for(router_app(registry)) as client:
        every = await client.get("/services/gpu")
        large = await client.get("/services/gpu", params={"cap": "gpu_mem>=16"})
        none = await client.get("/route/gpu/x", params={"cap": "gpu_mem>=64"})
        bad = await client.get("/services/gpu", params={"cap": "gpu_mem>=lots"})
    assert len(every.json()["providers"]) == 2
    assert [p["worker_id"] for p in large.json()["providers"]] == [big.worker_id]
    assert none.status_code == 503
    assert "with those capabilities" in none.json()["detail"]
    assert bad.status_code == 400
    assert "needs a number" in bad.json()["detail"]
