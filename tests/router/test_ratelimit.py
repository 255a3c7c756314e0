"""Rate limits per client address (issue 20): 429 with Retry-After in the router's error format,
counted by the address the router believes, shared through Redis for registration, failing open
when Redis is down; and /topology and /metrics sharing one registry read per window."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from limits import parse
from starlette.applications import Starlette

from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.config import (
    DEFAULT_RATE_REGISTER,
    DEFAULT_RATE_TOPOLOGY,
    RATE_OFF,
    TOPOLOGY_CACHE_SECONDS,
    RateSettings,
    RouterConfig,
)
from edge_router.ratelimit import (
    DOWN_RETRY_SECONDS,
    RateClass,
    RateLimiter,
    client_key,
    rate_class,
    storage_uri,
)
from tests.support.helpers import POLICY, ManualClock, make_record
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer
from tests.support.router import ADMIN_TOKEN, CLIENT, router_app

OTHER = ("198.51.100.20", 40000)  # a second documentation address
CLOUDFLARE = ("162.158.1.1", 443)  # inside Cloudflare's published ranges
NO_LIMITS = RateSettings(register=RATE_OFF, route=RATE_OFF, admin=RATE_OFF, topology=RATE_OFF)


def config(registry: RegistrySettings | None = None, **rates: str) -> RouterConfig:
    return RouterConfig(
        admin_token=ADMIN_TOKEN,
        registry=registry or RegistrySettings(),
        rates=RateSettings(**{**vars(NO_LIMITS), **rates}),
    )


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Run the app's lifespan; yields a factory of in-process clients, one per TCP peer."""
    clients: list[httpx.AsyncClient] = []

    def client(peer: tuple[str, int] = CLIENT) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=peer)
        made = httpx.AsyncClient(transport=transport, base_url="http://router")
        clients.append(made)
        return made

    async with app.router.lifespan_context(app):
        try:
            yield client
        finally:
            for made in clients:
                await made.aclose()


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def assert_limited(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"] == "rate_limited"
    assert 1 <= int(answer.headers["retry-after"]) <= 60


async def test_a_client_over_the_limit_gets_429_and_another_address_does_not(
    registry: Registry,
) -> None:
    app = router_app(registry, config=config(route="3/minute"))
    async with running(app) as client:
        one, other = client(CLIENT), client(OTHER)
        for _ in range(3):
            # No provider of ocr: the handler's own 503, the request was let through.
            assert (await one.get("/route/ocr/x")).status_code == 503
        assert_limited(await one.get("/route/ocr/x"))
        assert_limited(await one.post("/route/ocr", content=b"{}"))
        assert (await other.get("/route/ocr/x")).status_code == 503
        # Lookups and probes are not limited.
        assert (await one.get("/services/ocr")).status_code == 200
        assert (await one.get("/livez")).status_code == 200
        assert app.state.rate_limiter.stats.limited == {"route": 2}


async def test_cf_connecting_ip_is_believed_only_from_a_trusted_proxy(registry: Registry) -> None:
    app = router_app(registry, config=config(admin="2/minute"))
    async with running(app) as client:
        stranger, cloudflare = client(CLIENT), client(CLOUDFLARE)
        for n in range(2):
            spoofed = {**admin(), "CF-Connecting-IP": f"192.0.2.{n}"}
            assert (await stranger.post("/admin/cache/flush", headers=spoofed)).status_code == 200
        # A new claimed address each time does not make a stranger a new client.
        spoofed = {**admin(), "CF-Connecting-IP": "192.0.2.99", "X-Forwarded-For": "192.0.2.98"}
        assert_limited(await stranger.post("/admin/cache/flush", headers=spoofed))
        # From Cloudflare the header names the client: each one is counted alone.
        for n in range(3):
            forwarded = {**admin(), "CF-Connecting-IP": f"192.0.2.{n}"}
            assert (await cloudflare.post("/admin/cache/flush", headers=forwarded)).is_success


async def test_replicas_on_one_redis_share_the_register_limit(redis_url: str) -> None:
    settings = RegistrySettings(redis_url=redis_url, timeout=TEST_REDIS_TIMEOUT)
    registries = [open_registry(settings, policy=POLICY) for _ in range(2)]
    apps = [router_app(r, config=config(settings, register="3/minute")) for r in registries]
    records = [make_record(seq=seq).to_dict() for seq in (1, 2, 3, 4)]
    try:
        async with running(apps[0]) as first, running(apps[1]) as second:
            assert (await first().post("/workers", json=records[0])).status_code == 200
            assert (await first().post("/workers", json=records[1])).status_code == 200
            assert (await second().post("/workers", json=records[2])).status_code == 200
            # Each replica saw fewer than 3; together the client sent 3.
            assert_limited(await second().post("/workers", json=records[3]))
            assert_limited(await first().delete(f"/workers/{records[3]['worker_id']}"))
            # Another address registers through either replica.
            assert (await second(OTHER).post("/workers", json=records[3])).status_code != 429
    finally:
        for registry in registries:
            await registry.aclose()


async def test_a_refused_client_costs_no_redis_command_until_its_retry_after(
    redis_url: str,
) -> None:
    settings = RegistrySettings(redis_url=redis_url, timeout=TEST_REDIS_TIMEOUT)
    registry = open_registry(settings, policy=POLICY)
    clock = ManualClock()
    app = router_app(registry, config=config(settings, topology="1/minute"), monotonic=clock)
    redis = aioredis.Redis.from_url(redis_url)

    async def commands() -> int:
        return int((await redis.info("stats"))["total_commands_processed"])

    try:
        async with running(app) as client:
            peer = client()
            await peer.get("/metrics")
            assert_limited(refused := await peer.get("/metrics"))
            before = await commands()
            for _ in range(20):
                assert_limited(await peer.get("/metrics"))
            # The INFO above (and perhaps a ping of the events listener): none for the 20.
            middle = await commands()
            assert middle - before < 5
            clock.advance(int(refused.headers["retry-after"]) + 1)
            await peer.get("/metrics")  # refused or not, Redis is asked again
            assert await commands() - middle >= 2  # the INFO, and at least one for the request
    finally:
        await redis.aclose()
        await registry.aclose()


async def test_a_redis_that_is_down_fails_open_logged_once_and_counted(
    make_redis_server: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_redis_server()
    settings = RegistrySettings(redis_url=server.url, timeout=TEST_REDIS_TIMEOUT)
    registry = open_registry(settings, policy=POLICY)
    clock = ManualClock()
    app = router_app(registry, config=config(settings, admin="2/minute"), monotonic=clock)
    limiter: RateLimiter = app.state.rate_limiter
    try:
        async with running(app) as client:
            assert (await client().post("/admin/cache/flush", headers=admin())).is_success
            server.kill()
            caplog.set_level(logging.WARNING, logger="edge_router.ratelimit")
            # The flush itself works without Redis (not propagated): the limiter lets it through.
            assert (await client().post("/admin/cache/flush", headers=admin())).is_success
            assert limiter.stats.storage_failures == 1
            clock.advance(10)  # past the retry pause: Redis is tried again, and fails again
            assert (await client().post("/admin/cache/flush", headers=admin())).is_success
            assert limiter.stats.storage_failures == 2
            # Meanwhile this replica still counts the client in memory.
            assert_limited(await client().post("/admin/cache/flush", headers=admin()))
    finally:
        await registry.aclose()
    warnings = [r for r in caplog.records if r.name == "edge_router.ratelimit"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_flood_of_topology_and_metrics_reads_costs_one_registry_read_per_window(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    await registry.upsert(make_record())
    reads = 0
    real_records = registry.records

    async def counted(*, limit: int) -> Any:
        nonlocal reads
        # The bootstrap peers are read apart (a smaller scan, cached for a minute).
        reads += limit == RouterConfig().topology_limit
        return await real_records(limit=limit)

    monkeypatch.setattr(registry, "records", counted)
    clock = ManualClock()
    app = router_app(registry, config=config(), monotonic=clock)
    async with running(app) as client:
        peer = client()
        answers = await asyncio.gather(
            *(peer.get("/topology" if n % 2 else "/metrics") for n in range(40))
        )
        assert all(a.status_code == 200 for a in answers)
        assert reads == 1
        assert len((await peer.get("/topology")).json()["workers"]) == 1
        assert reads == 1
        clock.advance(TOPOLOGY_CACHE_SECONDS + 0.1)
        await asyncio.gather(*(peer.get("/topology") for _ in range(10)))
        assert reads == 2


async def test_loopback_clients_are_not_limited(registry: Registry) -> None:
    app = router_app(registry, config=config(route="1/minute"))
    async with running(app) as client:
        local = client(("127.0.0.1", 50000))
        for _ in range(3):
            assert (await local.get("/route/ocr/x")).status_code == 503


def test_classes_and_keys() -> None:
    assert rate_class("POST", "/workers") is RateClass.REGISTER
    assert rate_class("DELETE", "/workers/abc") is RateClass.REGISTER
    assert rate_class("GET", "/workers") is None
    assert rate_class("PUT", "/route/ocr/x") is RateClass.ROUTE
    assert rate_class("POST", "/admin/cache/flush") is RateClass.ADMIN
    assert rate_class("GET", "/metrics") is RateClass.TOPOLOGY
    assert rate_class("GET", "/services/ocr") is None
    # One IPv6 subscriber (a /64) is one client, whatever address it picks in it.
    subscriber = "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2::7") == client_key("2001:db8:1:2:ffff::1") == subscriber
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key("127.0.0.1") is None
    assert client_key("::1") is None
    assert client_key("not an address") is None


def test_defaults_leave_room_for_honest_clients() -> None:
    # A worker's fallback heartbeat: one POST /workers every 180 s.
    register = parse(DEFAULT_RATE_REGISTER)
    assert register.amount / register.get_expiry() >= 10 / 180
    # The topology page polling every 2 s and a Prometheus scrape every 15 s from one address.
    topology = parse(DEFAULT_RATE_TOPOLOGY)
    assert topology.amount / topology.get_expiry() >= 1 / 2 + 1 / 15


@pytest.mark.parametrize(
    ("url", "cluster", "uri", "options"),
    [
        (None, False, "async+memory://", {}),
        ("redis://h:7000/2", False, "async+redis://h:7000/2", {}),
        ("redis://:pw@h/0", False, "async+redis://:pw@h:6379/0", {}),
        ("rediss://h:7000", False, "async+rediss://h:7000", {}),
        ("unix:///run/r.sock?db=1", False, "async+redis+unix:///run/r.sock?db=1", {}),
        ("redis://h:7000", True, "async+redis+cluster://h:7000", {}),
        (
            "rediss+cluster://u:pw@a:7000,[::1]:7001",
            False,
            "async+redis+cluster://a:7000,[::1]:7001",
            {"username": "u", "password": "pw", "ssl": True},
        ),
        (
            "redis+sentinel://:pw@s1,s2:26380/main/3?sentinel_password=sp",
            False,
            "async+redis+sentinel://s1:26379,s2:26380/main",
            {"password": "pw", "db": 3},
        ),
    ],
)
def test_storage_uri_for_each_form_of_the_registry_url(
    url: str | None, cluster: bool, uri: str, options: dict[str, Any]
) -> None:
    settings = RegistrySettings(redis_url=url, cluster=cluster)
    got_uri, got_options = storage_uri(settings)
    assert got_uri == uri
    assert options.items() <= got_options.items()
    if "sentinel" in uri:
        assert got_options["sentinel_kwargs"]["password"] == "sp"
    if url is not None:
        # A down Redis answers within the registry's timeout, with no retries.
        assert got_options["socket_connect_timeout"] == settings.timeout
        assert got_options["retry"].get_retries() == 0


async def test_two_limiters_share_windows_on_every_redis_topology(
    registry_settings: RegistrySettings,
) -> None:
    rates = RateSettings(register="3/minute", admin=RATE_OFF, topology=RATE_OFF)
    limiters = [RateLimiter(rates, registry_settings) for _ in range(2)]
    try:
        allowed = [await limiters[n % 2].check(RateClass.REGISTER, "192.0.2.1") for n in range(3)]
        assert allowed == [None, None, None]
        wait = await limiters[1].check(RateClass.REGISTER, "192.0.2.1")
        assert wait is not None
        assert 1 <= wait <= 60
        assert await limiters[0].check(RateClass.REGISTER, "192.0.2.2") is None
        assert [limiter.stats.storage_failures for limiter in limiters] == [0, 0]
    finally:
        for limiter in limiters:
            await limiter.aclose()


async def test_a_redis_that_never_answers_holds_up_one_try_per_retry_pause() -> None:
    accepted = 0
    hold = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await hold.wait()  # reads nothing, answers nothing: a Redis that hangs
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = ManualClock()
    settings = RegistrySettings(redis_url=f"redis://127.0.0.1:{port}", timeout=0.3)
    limiter = RateLimiter(RateSettings(register="8/minute"), settings, clock=clock)
    try:
        assert await limiter.check(RateClass.REGISTER, "192.0.2.1") is None
        assert (accepted, limiter.stats.storage_failures) == (1, 1)
        for _ in range(7):
            assert await limiter.check(RateClass.REGISTER, "192.0.2.1") is None
        # Counted in memory meanwhile: Redis was not tried again before the pause ran out.
        assert accepted == 1
        assert await limiter.check(RateClass.REGISTER, "192.0.2.1") is not None
        clock.advance(DOWN_RETRY_SECONDS + 1)
        await limiter.check(RateClass.REGISTER, "192.0.2.2")
        assert (accepted, limiter.stats.storage_failures) == (2, 2)
    finally:
        hold.set()
        await limiter.aclose()
        server.close()
        await server.wait_closed()
