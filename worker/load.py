"""Pluggable load reporting: the value each heartbeat puts in the record (0.0 idle .. 1.0 full).

Any object with `async __call__() -> float` and `async aclose()` will do. Provided: a fixed
value, a counter of in-flight work (with an ASGI middleware for a service in this process),
and a poll of the worker's own HTTP service.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from dht_bridge.jsontext import loads_bounded

__all__ = ["HttpLoad", "InFlightCounter", "InFlightMiddleware", "LoadSource", "StaticLoad", "clamp"]

logger = logging.getLogger(__name__)

# The service's figure is a number or a flat object: anything deeper is not one.
MAX_LOAD_DEPTH = 4


class LoadSource(Protocol):
    """What the agent asks for the current load."""

    async def __call__(self) -> float:
        """The load now, from 0.0 to 1.0."""
        ...

    async def aclose(self) -> None:
        """Release what the source holds."""
        ...


def clamp(value: float) -> float:
    """`value` within 0.0..1.0 (NaN counts as idle)."""
    return min(max(value, 0.0), 1.0) if value == value else 0.0


class StaticLoad:
    """A configured, fixed load."""

    def __init__(self, value: float) -> None:
        self.value = clamp(value)

    async def __call__(self) -> float:
        """The configured value."""
        return self.value

    async def aclose(self) -> None:
        """Nothing to release."""


class InFlightCounter:
    """Load as in-flight requests over `capacity`; wrap the worker's own ASGI app with
    `middleware`, or count work by hand with `track()`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.in_flight = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one unit of work for the duration of the block."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """An ASGI app that counts every HTTP request `app` is serving."""
        return InFlightMiddleware(app, counter=self)

    async def __call__(self) -> float:
        """In-flight work over capacity."""
        return clamp(self.in_flight / self.capacity)

    async def aclose(self) -> None:
        """Nothing to release."""


class InFlightMiddleware:
    """Pure ASGI middleware counting the HTTP requests in flight into `counter`, for
    `Starlette(middleware=[Middleware(InFlightMiddleware, counter=counter)])`."""

    def __init__(self, app: ASGIApp, *, counter: InFlightCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count an HTTP request while the app serves it; pass anything else through."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.counter.track():
            await self.app(scope, receive, send)


class HttpLoad:
    """Polls the worker's own HTTP service at `url` for `{"load": x}` or `{"in_flight": n}`
    (divided by `capacity`); while it cannot say, `fallback`: 1 (full) by default, as it may
    well be down, and routers should send its share to others."""

    def __init__(
        self,
        url: str,
        *,
        capacity: int = 1,
        fallback: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 1.0,
    ) -> None:
        self.url = url
        self.capacity = max(capacity, 1)
        self.fallback = clamp(fallback)
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)

    async def __call__(self) -> float:
        """The service's own figure, or the fallback value."""
        try:
            response = await self._client.get(self.url)
            response.raise_for_status()
            return self._parse(loads_bounded(response.content, max_depth=MAX_LOAD_DEPTH))
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning(
                "cannot read load from %s (%s); reporting %s", self.url, exc, self.fallback
            )
            return self.fallback

    def _parse(self, body: Any) -> float:
        if isinstance(body, int | float) and not isinstance(body, bool):
            return clamp(float(body))
        if isinstance(body, dict):
            if isinstance(body.get("load"), int | float):
                return clamp(float(body["load"]))
            if isinstance(body.get("in_flight"), int | float):
                return clamp(float(body["in_flight"]) / self.capacity)
        raise ValueError(f"expected a number, {{'load': x}} or {{'in_flight': n}}, got {body!r}")

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()
