"""Probes: /livez (the process), /readyz (started, not draining, a backend answers),
/healthz (both sides and the version)."""

from __future__ import annotations

from collections.abc import Callable

from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.version import __version__
from edge_router.app import create_app
from edge_router.config import RouterConfig
from edge_router.state import RouterState
from tests.support.helpers import POLICY
from tests.support.redis_server import TEST_REDIS_TIMEOUT, RedisServer
from tests.support.router import client_for, router_app


async def test_ready_once_started_and_not_ready_while_draining(registry: Registry) -> None:
    app = router_app(registry)
    state: RouterState = app.state.rma
    assert not state.started
    async with client_for(app) as client:
        assert (await client.get("/livez")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        health = (await client.get("/healthz")).json()
        assert health["version"] == __version__
        assert health["draining"] is False
        state.draining = True  # what SIGTERM does first, for RMA_DRAIN_SECONDS
        draining = await client.get("/readyz")
        assert draining.status_code == 503
        assert draining.json()["why"] == "draining"
        # Still live, still serving lookups while it drains.
        assert (await client.get("/livez")).status_code == 200
        assert (await client.get("/services/ocr")).status_code == 200


async def test_not_ready_when_neither_redis_nor_the_dht_answers(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    registry = open_registry(
        RegistrySettings(redis_url=server.url, timeout=TEST_REDIS_TIMEOUT), policy=POLICY
    )
    try:
        async with client_for(router_app(registry)) as client:
            assert (await client.get("/readyz")).status_code == 200
            server.kill()
            answer = await client.get("/readyz")
            assert answer.status_code == 503
            assert answer.json()["why"] == "neither Redis nor the DHT answers"
            assert (await client.get("/livez")).status_code == 200
            assert (await client.get("/healthz")).status_code == 503
    finally:
        await registry.aclose()


async def test_a_router_started_not_ready_says_starting_until_told(registry: Registry) -> None:
    app = create_app(RouterConfig(), registry=registry, ready_at_start=False, listen_events=False)
    async with client_for(app) as client:
        starting = await client.get("/readyz")
        app.state.rma.started = True  # what the demo does once its workers are registered
        ready = await client.get("/readyz")
    assert (starting.status_code, starting.json()["why"]) == (503, "starting")
    assert ready.status_code == 200
