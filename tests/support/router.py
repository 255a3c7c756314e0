"""Running the router app in tests: lifespan, an in-process client, a mutable monotonic clock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette

from dht_bridge.dht.node import DHTNode
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from edge_router.app import create_app
from edge_router.config import RouterConfig
from tests.support.dht import TEST_SETTINGS, ManualClock
from tests.support.upstreams import serve

ADMIN_TOKEN = "test-admin-token-0123456789"
CLIENT = ("203.0.113.7", 40000)  # a documentation address: not Cloudflare, not us


def router_app(
    registry: Registry,
    *,
    dht: DHTNode | None = None,
    config: RouterConfig | None = None,
    monotonic: ManualClock | None = None,
    http: httpx.AsyncClient | None = None,
) -> Starlette:
    """The real app around the given backends."""
    config = config or RouterConfig(admin_token=ADMIN_TOKEN)
    kwargs = {"monotonic": monotonic} if monotonic is not None else {}
    return create_app(config, registry=registry, dht=dht, http=http, **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def client_for(
    app: Starlette, *, peer: tuple[str, int] = CLIENT
) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and talk to it in process, as a client at `peer`."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=peer)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield client


LOOPBACK = TunnelPolicy(allow_loopback=True)


@contextlib.asynccontextmanager
async def loopback_router(**changes: Any) -> AsyncIterator[str]:
    """A router on a real port, with the embedded registry and one coordinator DHT node,
    admitting loopback tunnels; yields its base URL."""
    node = DHTNode(TEST_SETTINGS, policy=LOOPBACK)
    await node.listen()
    registry = open_registry(RegistrySettings(), policy=LOOPBACK)
    config = RouterConfig(policy=LOOPBACK, coordinators=(node.address,), **changes)
    app = create_app(config, registry=registry, dht=node, listen_events=False)
    try:
        async with app.router.lifespan_context(app), serve(app) as url:
            yield url
    finally:
        await registry.aclose()
        await node.aclose()
