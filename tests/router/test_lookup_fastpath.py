"""A lookup hit answered in front of Starlette (edge_router.fastpath) is byte for byte what the
endpoint answers, is counted as the endpoint's would be, and leaves everything else to it."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dht_bridge.registry.registry import Registry
from edge_router.config import CacheSettings, RouterConfig
from edge_router.fastpath import RouterApp
from edge_router.ratelimit import rate_class
from tests.support.dht import ManualClock
from tests.support.helpers import make_record
from tests.support.router import client_for, router_app

CLOUDFLARE_PEER = ("173.245.48.10", 443)

# (query, headers, peer): the parameters the cache and the kept bodies are keyed on.
VARIANTS: list[tuple[str, dict[str, str], tuple[str, int] | None]] = [
    ("", {}, None),
    ("?limit=2", {}, None),
    ("?cap=gpu=true", {}, None),
    ("?limit=1&cap=gpu=true&cap=mem_gb>=9", {}, None),
    ("?region=DE", {}, None),
    ("", {"CF-IPCountry": "DE"}, CLOUDFLARE_PEER),
    ("", {"CF-IPCountry": "DE"}, None),  # not from a trusted proxy: the header is ignored
]


async def _providers(registry: Registry) -> None:
    now = time.time()
    for i, region in enumerate(("de", "us", "fr")):
        record = make_record(
            now=now,
            ttl=600,
            load=0.1 * (i + 1),
            region=region,
            capabilities={"gpu": i != 1, "mem_gb": 8 + i},
        )
        assert await registry.upsert(record)


def _figures(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.mark.parametrize(("query", "headers", "peer"), VARIANTS)
async def test_a_fast_hit_answers_what_the_endpoint_answers(
    registry: Registry, query: str, headers: dict[str, str], peer: tuple[str, int] | None
) -> None:
    await _providers(registry)
    app = router_app(registry, monotonic=ManualClock(0.0))
    assert isinstance(app, RouterApp)
    served = app.lookup_hits
    kwargs = {"peer": peer} if peer is not None else {}
    async with client_for(app, **kwargs) as client:
        answers: list[tuple[httpx.Response, bool]] = []
        for _ in range(3):
            before = served.served
            answer = await client.get("/services/ocr" + query, headers=headers)
            assert answer.status_code == 200, answer.text
            answers.append((answer, served.served == before + 1))
    # A miss, then a hit that builds its body (the endpoint), then one that sends it (fast).
    assert [(a.headers["x-cache"], fast) for a, fast in answers] == [
        ("MISS", False),
        ("HIT", False),
        ("HIT", True),
    ]
    slow, fast = answers[1][0], answers[2][0]
    assert fast.headers.raw == slow.headers.raw
    assert fast.content == slow.content
    assert fast.json()["source"] == "cache"


async def test_fast_hits_are_counted_as_the_endpoints_are(registry: Registry) -> None:
    await _providers(registry)
    app = router_app(registry, monotonic=ManualClock(0.0))
    assert isinstance(app, RouterApp)
    async with client_for(app) as client:
        for _ in range(5):
            assert (await client.get("/services/ocr")).status_code == 200
        figures = _figures((await client.get("/metrics")).text)
    assert app.lookup_hits.served == 3  # a miss, a hit through the endpoint, then 3 fast ones
    assert figures[("rma_requests_total", (("class", "lookup"), ("status", "200")))] == 5
    latency = "rma_request_duration_seconds_count"
    assert figures[(latency, (("route", "lookup_hit"),))] == 4
    assert figures[(latency, (("route", "lookup_miss"),))] == 1
    assert figures[("rma_cache_hits_total", ())] == 4
    assert figures[("rma_cache_misses_total", ())] == 1
    assert figures[("rma_edge_requests_today", ())] == 5


async def test_what_is_not_a_kept_fresh_hit_goes_through_the_endpoint(
    registry: Registry,
) -> None:
    await _providers(registry)
    clock = ManualClock(0.0)
    config = RouterConfig(cache=CacheSettings(ttl=5, stale=60))
    app = router_app(registry, config=config, monotonic=clock)
    assert isinstance(app, RouterApp)
    hits = app.lookup_hits
    async with client_for(app) as client:
        for _ in range(3):
            await client.get("/services/ocr")
        assert hits.served == 1
        # A bad parameter is answered in the router's error format, kept body or not.
        bad = await client.get("/services/ocr?limit=0")
        assert bad.status_code == 400
        assert bad.json()["error"] == "bad_request"
        assert (await client.get("/services/Bad_Name")).status_code == 400
        # HEAD, and paths the lookup route does not take, are the full stack's.
        assert (await client.head("/services/ocr")).status_code == 200
        assert (await client.get("/services/ocr/extra")).status_code == 404
        assert hits.served == 1
        clock.advance(6)  # the answer is no longer fresh: read again, through the endpoint
        again = await client.get("/services/ocr")
        assert again.headers["x-cache"] == "MISS"
        assert hits.served == 1


def test_lookups_are_in_no_rate_class() -> None:
    # The fast path skips the rate limit middleware because of this (and checks it per request).
    assert rate_class("GET", "/services/ocr") is None
