"""The routing proxy's connections to tunnels: kept alive per tunnel origin, bounded in all and
per origin.

httpcore's own pool (httpx's default) walks every connection it holds on each request and on
each release, polls the socket of each idle one, and counts idle connections once per connection
held (quadratic): with 64 requests in flight it spent more CPU than the rest of the router, and a
larger pool made it worse (measured in bench/router_bench.py, see bench/README.md). Here each
origin has a stack of idle HTTP/1.1 connections and a list of HTTP/2 ones that take several
requests at once; a request takes the most recently used idle connection and checks that one
only. HTTP/1.1 connections are the lean ones of edge_router.upstream.http11 (httpcore's cost
most of a routed request's CPU); with HTTP/2 enabled, httpcore's, which negotiate either.

One origin (one worker's tunnel) holds at most `per_origin_limit` of them: a tunnel that
stalls its answers ties up its own share, not the connections every other worker is reached
by. A request finding its origin's share busy waits in line, and the next connection of that
origin to come free (idle, or closed and replaced) is handed to the first in line.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpcore
import httpx

from edge_router.upstream.http11 import LeanHTTP11Connection

__all__ = ["TunnelClient", "TunnelPool", "TunnelTransport", "per_origin_limit"]

# An origin as a dict key (httpcore's Origin is not hashable): scheme, host, port.
_Key = tuple[bytes, bytes, int]
_Connection = httpcore.AsyncConnectionInterface
# A request waiting for a connection of its origin, and that origin (to open one for it).
_Waiter = tuple["asyncio.Future[_Connection]", httpcore.Origin]

# One origin's share of the pool: this fraction of it, and never fewer connections than
# PER_ORIGIN_MIN (nor more than the pool). 64 of the default 512.
PER_ORIGIN_SHARE = 8
PER_ORIGIN_MIN = 8


def per_origin_limit(max_connections: int) -> int:
    """How many of `max_connections` one tunnel origin may hold open at once."""
    return min(max_connections, max(PER_ORIGIN_MIN, max_connections // PER_ORIGIN_SHARE))


class TunnelPool(httpcore.AsyncConnectionInterface):
    """At most `max_connections` connections to all origins, `per_origin_limit` of them to one;
    idle ones kept `keepalive_expiry` seconds. A request finding every connection busy waits for
    one, up to the pool timeout of its request (httpcore.PoolTimeout)."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None,
        http2: bool = False,
    ) -> None:
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._ssl = ssl_context
        self._http2 = http2
        # Every open connection and its origin; idle HTTP/1.1 ones stacked per origin (the most
        # recently used last); HTTP/2 ones listed per origin while open, busy or not.
        self._open: dict[_Connection, _Key] = {}
        self._idle: dict[_Key, list[_Connection]] = {}
        self._shared: dict[_Key, list[_Connection]] = {}
        self._freed = asyncio.Condition()
        self._waiting = 0
        self._per_origin = per_origin_limit(max_connections)
        self._counts: dict[_Key, int] = {}  # open connections per origin
        self._lines: dict[_Key, collections.deque[_Waiter]] = {}  # waiting for their origin's

    @property
    def connections(self) -> int:
        """Connections open now, busy or idle."""
        return len(self._open)

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        """Send `request` on a kept-alive connection of its origin, or on a new one."""
        scheme = request.url.scheme
        if scheme not in (b"http", b"https"):
            # As httpcore's own pool says it (httpx maps it to UnsupportedProtocol).
            raise httpcore.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{scheme.decode('latin-1')}://'."
            )
        origin = request.url.origin
        key = (origin.scheme, origin.host, origin.port)
        while True:
            connection = await self._reusable(key)
            if connection is None:
                connection = await self._new(origin, key, _pool_timeout(request))
            try:
                response = await connection.handle_async_request(request)
            except httpcore.ConnectionNotAvailable:
                continue  # taken or closed meanwhile (an HTTP/2 GOAWAY, say): another one
            except BaseException:
                await self._release(connection)
                raise
            if response.extensions.get("http_version") == b"HTTP/2":
                shared = self._shared.setdefault(key, [])
                if connection not in shared:
                    shared.append(connection)
            return httpcore.Response(
                status=response.status,
                headers=response.headers,
                content=_PooledStream(response.stream, self, connection),
                extensions=response.extensions,
            )

    async def _reusable(self, key: _Key) -> _Connection | None:
        for connection in self._shared.get(key, ()):
            if connection.is_available():
                return connection
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if not idle:
                del self._idle[key]  # origins come and go with workers: no empty lists kept
            # Only the connection taken is checked (its keep-alive age, and whether the
            # tunnel closed it while it was idle).
            if connection.is_available() and not connection.has_expired():
                return connection
            await self._release(connection)
            idle = self._idle.get(key)
        return None

    async def _new(self, origin: httpcore.Origin, key: _Key, wait: float | None) -> _Connection:
        if self._counts.get(key, 0) >= self._per_origin:
            return await self._in_line(origin, key, wait)
        if len(self._open) >= self._max:
            await self._evict_idle()
        if len(self._open) >= self._max:
            self._waiting += 1
            try:
                async with asyncio.timeout(wait), self._freed:
                    await self._freed.wait_for(lambda: len(self._open) < self._max)
            except TimeoutError:
                raise httpcore.PoolTimeout(
                    f"all {self._max} upstream connections stayed busy"
                ) from None
            finally:
                self._waiting -= 1
            if self._counts.get(key, 0) >= self._per_origin:  # filled while this one waited
                return await self._in_line(origin, key, wait)
        self._counts[key] = self._counts.get(key, 0) + 1
        return self._opened(origin, key)

    def _opened(self, origin: httpcore.Origin, key: _Key) -> _Connection:
        """A new connection to `origin`, counted open (it connects with its first request)."""
        connection: _Connection
        if self._http2:
            connection = httpcore.AsyncHTTPConnection(
                origin=origin,
                ssl_context=self._ssl,
                keepalive_expiry=self._expiry,
                http1=True,
                http2=True,
            )
        else:
            connection = LeanHTTP11Connection(
                origin, ssl_context=self._ssl, keepalive_expiry=self._expiry
            )
        self._open[connection] = key
        return connection

    async def _in_line(self, origin: httpcore.Origin, key: _Key, wait: float | None) -> _Connection:
        """Wait, first come first served, for a connection of `key` that came free; an idle one
        that the tunnel closed meanwhile is closed, and the wait goes on."""
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        while True:
            future: asyncio.Future[_Connection] = loop.create_future()
            waiter = (future, origin)
            self._lines.setdefault(key, collections.deque()).append(waiter)
            # A timer rather than a cancel scope: the future ends either handed a connection or
            # timed out, never both, so no connection is lost to a timeout.
            timer = None
            if deadline is not None:
                host = origin.host.decode("ascii")
                busy = f"all {self._per_origin} connections to {host} stayed busy"
                timer = loop.call_later(deadline - loop.time(), _too_late, future, busy)
            try:
                connection = await future
            except BaseException:
                if future.done() and not future.cancelled() and future.exception() is None:
                    await self._give_back(future.result())  # handed over as this one was cancelled
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                line = self._lines.get(key)
                if line is not None and waiter in line:
                    line.remove(waiter)
                    if not line:
                        del self._lines[key]
            if not connection.is_idle() or (
                connection.is_available() and not connection.has_expired()
            ):
                return connection
            await self._release(connection)

    async def _give_back(self, connection: _Connection) -> None:
        if connection.is_idle():
            await self._returned(connection)
        else:
            await self._release(connection)  # opened for a waiter that left: never connected

    def _hand_over(self, key: _Key, connection: _Connection | None) -> bool:
        """Give the first request waiting for `key` this idle connection, or (None) a new one in
        place of one closed; False when none waits."""
        line = self._lines.get(key)
        while line:
            future, origin = line.popleft()
            if not line:
                del self._lines[key]
            if future.done():
                continue  # timed out or cancelled
            future.set_result(connection or self._opened(origin, key))
            return True
        return False

    async def _evict_idle(self) -> None:
        """Close the longest idle connection of some origin, to make room for another."""
        for idle in self._idle.values():
            if idle:
                await self._release(idle[0])
                return

    async def _returned(self, connection: _Connection) -> None:
        """A response was read or closed: keep its connection for the next request, or close it."""
        key = self._open.get(connection)
        if key is None or connection.is_closed():
            await self._release(connection)
        elif connection.is_idle() and self._lines and self._hand_over(key, connection):
            pass  # a request waiting for this origin's share has it
        elif connection.is_idle() and self._waiting:
            await self._release(connection)  # a request waits for room: this one's is freed
        elif connection.is_idle() and connection not in self._shared.get(key, ()):
            self._idle.setdefault(key, []).append(connection)

    async def _release(self, connection: _Connection) -> None:
        key = self._open.pop(connection, None)
        if key is not None:
            for groups in (self._shared, self._idle):
                group = groups.get(key)
                if group and connection in group:
                    group.remove(connection)
                    if not group:
                        del groups[key]
            # A request waiting for this origin's share takes the place (a new connection).
            if not (self._lines and self._hand_over(key, None)):
                left = self._counts[key] - 1
                if left:
                    self._counts[key] = left
                else:
                    del self._counts[key]
                if self._waiting:
                    async with self._freed:
                        self._freed.notify_all()
        await connection.aclose()

    async def aclose(self) -> None:
        """Close every connection."""
        connections = list(self._open)
        self._open.clear()
        self._idle.clear()
        self._shared.clear()
        self._counts.clear()
        for connection in connections:
            await connection.aclose()

    async def __aenter__(self) -> TunnelPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()


class _PooledStream:
    """A response body that hands its connection back to the pool once read or closed."""

    def __init__(self, stream: Any, pool: TunnelPool, connection: _Connection) -> None:
        self._stream = stream
        self._pool = pool
        self._connection = connection
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        """Close the body and give the connection back."""
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            await self._pool._returned(self._connection)


class TunnelTransport(httpx.AsyncHTTPTransport):
    """httpx's transport (its request mapping and error translation) over a `TunnelPool`."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float,
        http2: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context`: how tunnels' certificates are checked (default: certifi's roots, as
        httpx checks them; tests give one that trusts their own)."""
        super().__init__(http2=http2, trust_env=False)
        self.pool = TunnelPool(
            max_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            http2=http2,
        )
        # httpx keeps its pool here and sends every request through it (httpx 0.2x).
        self._pool = self.pool  # type: ignore[assignment]


def _too_late(future: asyncio.Future[_Connection], why: str) -> None:
    if not future.done():
        future.set_exception(httpcore.PoolTimeout(why))


def _pool_timeout(request: httpcore.Request) -> float | None:
    timeouts = request.extensions.get("timeout", {})
    value = timeouts.get("pool")
    return None if value is None else float(value)


class TunnelClient(httpx.AsyncClient):
    """The proxy's httpx client over a `TunnelTransport`, with `forward`: a request straight to
    the pool, without the client's auth, redirect, cookie, hook and logging steps (the proxy
    uses none of them: no auth, no redirects followed, a cookie jar that keeps nothing, and an
    info line per request is not for the hot path). Every other use is plain httpx."""

    def __init__(self, *, transport: TunnelTransport, **kwargs: Any) -> None:
        super().__init__(transport=transport, **kwargs)
        self.tunnels = transport

    async def forward(self, request: httpx.Request) -> httpx.Response:
        """Send `request` (its timeouts in its extensions) and return the streamed answer."""
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self.tunnels.handle_async_request(request)
        response.request = request
        return response
