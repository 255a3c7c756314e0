"""The router's hottest endpoint, `GET /services/{service}`, served in front of Starlette.

Through Starlette a lookup paid for four middleware layers (the server-error catcher, request
accounting, the rate limit, the exception handlers), route matching and the endpoint wrapper: as
much CPU as a cache hit's own work (bench/router_bench.py, see bench/README.md). `RouterApp`
answers a GET lookup before all that: a cache hit whose body was built earlier is sent at once
(`handlers.kept_hit`), any other through the endpoint's own code (`handlers.lookup_answer`), with
the headers the endpoint sends (`handlers.lookup_headers` builds both). HEAD, a lookup with a bad
parameter, and every other request go through the full stack unchanged.

What the fast path does itself, as the skipped layers would:
- accounting: the same class, status and latency series (`accounting.answered`), the CF-Ray
  bound to every line logged while a lookup reads a backend (a kept hit logs nothing);
- errors: the app's handler (`errors.handle_error`) answers them in the router's format; an
  unexpected one is answered 500 and raised again for the server to log, as Starlette does.
What it skips: the rate limit, since lookups are in no rate class (`ratelimit.rate_class` is
None for them; checked on every request, so a lookup class added later takes the full stack).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from dht_bridge.errors import RMAError
from dht_bridge.logcontext import log_fields_bound
from edge_router.accounting import answered, cf_ray
from edge_router.cache import CacheState
from edge_router.errors import BadRequest, handle_error
from edge_router.handlers import LookupAsk, kept_hit, lookup_answer, lookup_ask, lookup_headers
from edge_router.ratelimit import rate_class
from edge_router.state import RouterState

__all__ = ["LOOKUP_PREFIX", "FastLookups", "RouterApp"]

LOOKUP_PREFIX = "/services/"


class FastLookups:
    """Answers GET lookups in front of the middleware; counts the kept hits it sent."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.kept_hits = 0  # hits sent from kept bytes (the tests tell the paths apart by it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer `scope` (a GET under LOOKUP_PREFIX); False, with nothing sent or counted,
        when the full stack must answer it."""
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
            await self._answer(scope, receive, send, ask, started)
            return True
        body, age = found
        state.lookups.count_hit()
        try:
            await _send(send, lookup_headers(state, CacheState.HIT, age, body), body)
        finally:
            answered(state.metrics, scope, 200, time.perf_counter() - started, "HIT", None)
        self.kept_hits += 1
        return True

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, ask: LookupAsk, started: float
    ) -> None:
        state = self.state
        ray = cf_ray(scope)
        status, cache = 500, None
        try:
            # Every line logged while serving it carries the request's CF-Ray (JSON logs).
            with log_fields_bound(cf_ray=ray) if ray else contextlib.nullcontext():
                try:
                    body, cache_state, age = await lookup_answer(state, ask)
                except Exception as exc:
                    response = await handle_error(Request(scope), exc)
                    expected = isinstance(exc, RMAError | HTTPException)
                    if expected:
                        status = response.status_code
                    await response(scope, receive, send)
                    if not expected:
                        raise  # as Starlette's server-error middleware: the server logs it
                    return
                status, cache = 200, cache_state.value
                await _send(send, lookup_headers(state, cache_state, age, body), body)
        finally:
            answered(state.metrics, scope, status, time.perf_counter() - started, cache, ray)


async def _send(send: Send, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RouterApp(Starlette):
    """The router's Starlette app, with `FastLookups` in front of its middleware and routes."""

    def __init__(self, state: RouterState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lookups = FastLookups(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A GET lookup answered at once; everything else through Starlette."""
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(LOOKUP_PREFIX)
            and await self.lookups(scope, receive, send)
        ):
            return
        await super().__call__(scope, receive, send)
