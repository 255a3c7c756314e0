"""GET lookups answered in front of Starlette (edge_router.fastpath) are byte for byte what the
full stack answers, hit, miss, stale or error, and are counted as it counts them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.config import CacheSettings, RouterConfig
from edge_router.fastpath import RouterApp
from edge_router.ratelimit import rate_class
from tests.support.dht import ManualClock
from tests.support.helpers import POLICY, make_record
from tests.support.redis_server import RedisServer
from tests.support.router import CLIENT, router_app

CLOUDFLARE_PEER = ("173.245.48.10", 443)
Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# (query, headers, peer): the parameters the cache and the kept bodies are keyed on.
VARIANTS: list[tuple[str, dict[str, str], tuple[str, int]]] = [
    ("", {}, CLIENT),
    ("?limit=2", {}, CLIENT),
    ("?cap=gpu=true", {}, CLIENT),
    ("?limit=1&cap=gpu=true&cap=mem_gb>=9", {}, CLIENT),
    ("?region=DE", {}, CLIENT),
    ("", {"CF-IPCountry": "DE"}, CLOUDFLARE_PEER),
    ("", {"CF-IPCountry": "DE"}, CLIENT),  # not from a trusted proxy: the header is ignored
]


class FullStack:
    """The app without its fast path: every request through Starlette's middleware and routes."""

    def __init__(self, app: RouterApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await Starlette.__call__(self.app, scope, receive, send)


@contextlib.asynccontextmanager
async def two_routers(
    registry: Registry, config: RouterConfig, clock: ManualClock, peer: tuple[str, int] = CLIENT
) -> AsyncIterator[tuple[RouterApp, httpx.AsyncClient, RouterApp, httpx.AsyncClient]]:
    """Two routers on the same registry and clock: one as served, one through the full stack
    only; a client for each."""
    apps = [router_app(registry, config=config, monotonic=clock) for _ in range(2)]
    fast, full = apps
    assert isinstance(fast, RouterApp)
    assert isinstance(full, RouterApp)
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for app, asgi in ((fast, fast), (full, FullStack(full))):
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=asgi, client=peer, raise_app_exceptions=False)
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://router")
                )
            )
        yield fast, clients[0], full, clients[1]


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


def _same(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.headers.raw, a.content) == (b.status_code, b.headers.raw, b.content)


def _figures(text: str) -> Figures:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _lookup_counts(figures: Figures) -> Figures:
    """The request counts and latency series of lookups (not the timings themselves)."""
    counted = ("rma_requests_total", "rma_request_duration_seconds_count")
    return {
        key: value
        for key, value in figures.items()
        if key[0].startswith("rma_cache_")
        or (key[0] in counted and any(v.startswith("lookup") for _, v in key[1]))
    }


@pytest.mark.parametrize(("query", "headers", "peer"), VARIANTS)
async def test_fast_lookups_answer_what_the_full_stack_answers(
    registry: Registry, query: str, headers: dict[str, str], peer: tuple[str, int]
) -> None:
    await _providers(registry)
    clock = ManualClock(0.0)
    async with two_routers(registry, RouterConfig(), clock, peer) as (fast, one, full, other):
        for expected in ("MISS", "HIT", "HIT"):
            a = await one.get("/services/ocr" + query, headers=headers)
            b = await other.get("/services/ocr" + query, headers=headers)
            assert a.status_code == 200, a.text
            assert a.headers["x-cache"] == expected
            _same(a, b)
        # The second hit was sent from the bytes the first one kept; the full stack sent none.
        assert (fast.lookups.kept_hits, full.lookups.kept_hits) == (1, 0)
        counts = [_lookup_counts(_figures((await c.get("/metrics")).text)) for c in (one, other)]
    assert counts[0] == counts[1]
    assert counts[0][("rma_requests_total", (("class", "lookup"), ("status", "200")))] == 3


async def test_stale_answers_and_errors_are_the_full_stacks(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    registry = open_registry(RegistrySettings(redis_url=server.url, timeout=0.5), policy=POLICY)
    try:
        await _providers(registry)
        clock = ManualClock(0.0)
        config = RouterConfig(cache=CacheSettings(ttl=5, stale=60))
        async with two_routers(registry, config, clock) as (fast, one, _, other):

            async def both(url: str) -> httpx.Response:
                a, b = await one.get(url), await other.get(url)
                _same(a, b)
                return a

            assert (await both("/services/ocr")).headers["x-cache"] == "MISS"
            bad_filter = await both("/services/ocr?cap=gpu")  # refused by the endpoint's code
            assert bad_filter.status_code == 400
            assert (await both("/services/ocr?limit=0")).status_code == 400  # before it
            assert (await both("/services/Bad_Name")).status_code == 400
            assert (await both("/services/ocr/extra")).status_code == 404
            server.kill()
            clock.advance(6)
            stale = await both("/services/ocr")
            assert stale.headers["x-cache"] == "STALE"
            assert stale.headers["x-rma-warning"]
            clock.advance(61)
            gone = await both("/services/ocr")
            assert gone.status_code == 503
            assert gone.json()["error"] == "unavailable"
            counts = [
                _lookup_counts(_figures((await c.get("/metrics")).text)) for c in (one, other)
            ]
        assert fast.lookups.kept_hits == 0  # nothing above was a kept hit
        assert counts[0] == counts[1]
        latency = "rma_request_duration_seconds_count"
        assert counts[0][(latency, (("route", "lookup_stale"),))] == 1
        assert counts[0][("rma_requests_total", (("class", "lookup"), ("status", "503")))] == 1
    finally:
        await registry.aclose()


async def test_an_unexpected_error_is_answered_500_and_raised_as_starlette_does(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(0.0)
    async with two_routers(registry, RouterConfig(), clock) as (fast, one, full, other):

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        for app in (fast, full):
            monkeypatch.setattr(app.state.rma.providers, "find", broken)
        a, b = await one.get("/services/ocr"), await other.get("/services/ocr")
        _same(a, b)
        assert a.status_code == 500
        counts = [_lookup_counts(_figures((await c.get("/metrics")).text)) for c in (one, other)]
    assert counts[0] == counts[1]
    assert counts[0][("rma_requests_total", (("class", "lookup"), ("status", "500")))] == 1
    raising = router_app(registry, monotonic=clock)
    monkeypatch.setattr(raising.state.rma.providers, "find", broken)
    transport = httpx.ASGITransport(app=raising, client=CLIENT)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        with pytest.raises(RuntimeError, match="a bug"):  # for the server to log, as before
            await client.get("/services/ocr")


def test_lookups_are_in_no_rate_class() -> None:
    # The fast path skips the rate limit middleware because of this (and checks it per request).
    assert rate_class("GET", "/services/ocr") is None
