"""The router's app factory: routes, one exception handler, request accounting, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import RMAError
from dht_bridge.registry.registry import Registry
from edge_router import catalog, handlers, health, openapi, page
from edge_router.accounting import Accounting
from edge_router.cache import LookupCache
from edge_router.cloudflare import ClientResolver
from edge_router.config import TOPOLOGY_CACHE_SECONDS, RouterConfig
from edge_router.errors import handle_error
from edge_router.events import listen_for_events
from edge_router.fastpath import RouterApp
from edge_router.metrics import Metrics
from edge_router.providers import ProviderSource
from edge_router.ratelimit import RateLimit, RateLimiter
from edge_router.state import RouterState
from edge_router.upstream.proof import ProofSettings, TunnelProver
from edge_router.upstream.proxy import Proxy, ProxySettings, upstream_client

logger = logging.getLogger(__name__)

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# The events listener notices the stop flag within one poll window (about a second).
LISTENER_STOP_SECONDS = 5.0


def create_app(
    config: RouterConfig,
    *,
    registry: Registry,
    dht: DHTNode | None = None,
    http: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    listen_events: bool = True,
    extra_figures: Callable[[], Mapping[str, float]] | None = None,
    ready_at_start: bool = True,
) -> Starlette:
    """Build the router around backends the caller opened (and closes).

    `ready_at_start=False`: `/readyz` says "starting" until the caller sets
    `app.state.rma.started` (the demo does, once its workers are registered).

    `http` is the client the proxy uses (inject one with a test transport); when omitted the
    app creates one and closes it on shutdown.
    """
    proxy_settings = ProxySettings(
        connect_timeout=config.proxy_connect_timeout,
        read_timeout=config.proxy_read_timeout,
        # Every body the router accepts whole can be sent again to another provider.
        replay_limit=config.max_body,
        max_connections=config.proxy_max_connections,
    )
    owns_http = http is None
    client = http or upstream_client(proxy_settings)
    metrics = Metrics(daily_budget=config.daily_budget, clock=clock)
    state = RouterState(
        config=config,
        registry=registry,
        dht=dht,
        http=client,
        providers=ProviderSource(registry, dht, clock=monotonic),
        lookups=LookupCache(
            ttl=config.cache.ttl,
            stale=config.cache.stale,
            maxsize=config.cache.maxsize,
            clock=monotonic,
        ),
        peers=LookupCache(
            ttl=min(config.bootstrap_ttl, 60),
            stale=config.bootstrap_ttl * 4,
            maxsize=1,  # one pool, whatever the region asked (see edge_router.bootstrap)
            clock=monotonic,
        ),
        catalog=LookupCache(
            ttl=config.cache.ttl,
            stale=config.cache.stale,
            maxsize=1,
            clock=monotonic,
        ),
        # No stale answer: a registry that fails shows as such on /topology and /metrics.
        introspection=LookupCache(
            ttl=TOPOLOGY_CACHE_SECONDS, stale=0.0, maxsize=1, clock=monotonic
        ),
        proxy=Proxy(client, proxy_settings, clock=monotonic, observe=metrics.upstream),
        metrics=metrics,
        resolver=ClientResolver(config.trusted_proxies, origin_secret=config.origin_secret),
        clock=clock,
        extra_figures=extra_figures,
    )

    # Proves tunnel URLs in the background; routes read its verdicts (edge_router.upstream.proof).
    prover = TunnelProver(
        client,
        ProofSettings(mode=config.tunnel_proof),
        clock=monotonic,
        available=state.proxy.health.available,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        prover.start()
        listener = None
        if listen_events:
            listener = asyncio.get_running_loop().create_task(
                listen_for_events(state, stop), name="router-events"
            )
        state.started = ready_at_start
        try:
            yield
        finally:
            state.draining = True
            stop.set()
            if listener is not None:
                done, _ = await asyncio.wait({listener}, timeout=LISTENER_STOP_SECONDS)
                if not done:
                    listener.cancel()
                    await asyncio.gather(listener, return_exceptions=True)
            await prover.aclose()  # before the client it fetches with is closed
            if owns_http:
                await client.aclose()
            await limiter.aclose()

    routes = [
        Route("/dht/bootstrap", handlers.bootstrap, methods=["GET"]),
        Route("/services", catalog.services, methods=["GET"]),
        Route("/services/{service}", handlers.lookup, methods=["GET"]),
        Route("/workers", handlers.register, methods=["POST"]),
        Route("/workers/{worker_id}", handlers.leave, methods=["DELETE"]),
        Route("/route/{service}/{path:path}", handlers.route, methods=ALL_METHODS),
        Route("/route/{service}", handlers.route, methods=ALL_METHODS),
        Route("/admin/cache/flush", handlers.flush, methods=["POST"]),
        Route("/topology", handlers.topology, methods=["GET"]),
        Route("/livez", health.livez, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.openapi, methods=["GET"]),
        *page.routes(),
    ]
    # A cache hit of a lookup is answered in front of the middleware and routes (fastpath).
    app = RouterApp(
        state,
        routes=routes,
        lifespan=lifespan,
        # Our errors and HTTP errors are answered by the exception middleware; the catch-all
        # Exception handler answers 500 too, but Starlette re-raises it for the server to log.
        exception_handlers={
            RMAError: handle_error,
            HTTPException: handle_error,
            Exception: handle_error,
        },
    )
    app.state.rma = state
    app.state.tunnel_proof = prover
    limiter = RateLimiter(config.rates, config.registry, clock=monotonic)
    app.state.rate_limiter = limiter
    # Inside Accounting, so that the 429s are counted too.
    app.add_middleware(RateLimit, limiter=limiter, resolver=state.resolver)
    app.add_middleware(Accounting, metrics=state.metrics)
    return app
