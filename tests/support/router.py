"""Running the router app in tests: lifespan, an in-process client, a mutable monotonic clock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette

from dht_bridge.dht.node import DHTNode
from dht_bridge.registry.registry import Registry
from edge_router.app import create_app
from edge_router.config import RouterConfig
from tests.support.dht import ManualClock

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
