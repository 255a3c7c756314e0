"""The router's hottest request, a lookup answered from the cache, served in front of Starlette.

A cache hit of `GET /services/{service}` sends bytes built earlier (handlers.lookup keeps them
with the cached answer). Through Starlette it paid for four middleware layers (the server-error
catcher, request accounting, the rate limit, the exception handlers), the router's route
matching and the endpoint wrapper: as much as the hit's own work (bench/router_bench.py, see
bench/README.md). `RouterApp` answers such a hit before any of that, with the same bytes and
headers as the endpoint (`handlers.lookup_headers` builds both), and passes every other request,
and every lookup that is not a fresh kept answer, to the full stack unchanged.

What a hit skips, and why that is safe:
- the rate limit: lookups are in no rate class (`ratelimit.rate_class` is None for them; checked
  here on every request, so a lookup class added later takes the full stack);
- the exception handlers: nothing here raises an RMAError; a bad parameter (BadRequest) falls
  back to the full stack, which answers it in the router's error format;
- the CF-Ray bound to log lines: a hit logs nothing;
- the accounting middleware: the hit counts itself, with the same class, status and latency
  series (`Metrics.count`).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from edge_router.cache import CacheState
from edge_router.errors import BadRequest
from edge_router.handlers import kept_hit, lookup_ask, lookup_headers
from edge_router.metrics import request_class, route_label
from edge_router.ratelimit import rate_class
from edge_router.state import RouterState

__all__ = ["LOOKUP_PREFIX", "LookupHits", "RouterApp"]

LOOKUP_PREFIX = "/services/"


class LookupHits:
    """Answers a lookup whose answer is cached fresh and already serialized; counts them."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.served = 0  # hits answered here (the tests tell the two paths apart by it)

    async def __call__(self, scope: Scope, send: Send) -> bool:
        """Answer `scope` (a GET under LOOKUP_PREFIX) if it is a kept fresh hit; False when the
        full stack must answer it. Nothing is sent before it is known to be a hit."""
        path: str = scope["path"]
        service = path[len(LOOKUP_PREFIX) :]
        # Starlette's route takes one path segment; a mounted app (root_path) goes the full way.
        if not service or "/" in service or scope.get("root_path"):
            return False
        if rate_class("GET", path) is not None:
            return False
        started = time.perf_counter()
        state = self.state
        try:
            ask = lookup_ask(state, Request(scope), service)
        except BadRequest:
            return False
        found = kept_hit(state, ask)
        if found is None:
            return False
        body, age = found
        state.lookups.count_hit()
        klass = request_class(path)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": lookup_headers(state, CacheState.HIT, age, body),
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            # As the accounting middleware counts a request whose answer has begun.
            state.metrics.count(
                klass, 200, time.perf_counter() - started, route_label(klass, path, "HIT")
            )
        self.served += 1
        return True


class RouterApp(Starlette):
    """The router's Starlette app, with `LookupHits` in front of its middleware and routes."""

    def __init__(self, state: RouterState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lookup_hits = LookupHits(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A kept lookup hit answered at once; everything else through Starlette."""
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(LOOKUP_PREFIX)
            and await self.lookup_hits(scope, send)
        ):
            return
        await super().__call__(scope, receive, send)
