"""The routing proxy: `* /route/{service}/{path}` forwarded to a provider's tunnel URL.

Providers are chosen load-aware (the less loaded of two random healthy ones). A connect failure
is retried once on another provider, and so is, as Go's net/http does it, a request that a
reused keep-alive connection lost before any answer when it is idempotent (RFC 9110 section
9.2.2) or carries an Idempotency-Key: the provider may have closed an idle connection as the
request came, or taken the request and died, and only such a request may run twice (a pooled
connection the provider closed before any byte went out is not used: see `pool`); a record
whose tunnel URL cannot be requested is skipped; a provider whose gateway
answers 502, 503 or 504 (its service is down behind cloudflared) fails the try, which a safe
request retries elsewhere; a provider that keeps failing is ejected for a while; one that
answers 429 (or 503 with Retry-After) is skipped for its Retry-After. Bodies
stream both ways: only a request body up to `replay_limit` bytes is held in memory, so that it
can be sent again on a retry. The upstream request is built from parsed, checked parts only:
httpx frames the body itself, and no Content-Length or Transfer-Encoding of the client's is
passed on; a streamed body keeps the length the client declared (the server checked it, and
the exchange fails unless exactly that many bytes go out), so that a provider still sees how
large an upload is before it reads it.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import http.cookiejar
import logging
import math
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from dht_bridge.httpwire import HOP_BY_HOP, connection_tokens, end_to_end
from dht_bridge.records import WorkerRecord
from edge_router.errors import (
    BROKEN_OFF,
    BadRequest,
    NoProvider,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from edge_router.framing import header_problem
from edge_router.upstream.pool import TunnelClient, TunnelTransport

logger = logging.getLogger(__name__)

WORKER_HEADER = b"x-rma-worker"
# Our own headers (the Cloudflare Worker's origin secret among them) never reach a volunteer, and
# a volunteer cannot make its response look as if the router had said something.
INTERNAL_PREFIX = b"x-rma-"
# Host is set by httpx from the tunnel URL, and Content-Length from the body it sends (a client's
# framing is never passed on); the X-Forwarded-* and CF-Ray are rebuilt from what the app
# trusts; other client-address and location claims (Forwarded, X-Client-IP, CF-IPCountry among
# them) are unverified, and Expect: 100-continue is a conversation with us, not with the
# provider.
REQUEST_DROP = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"cf-ray",
        b"cf-connecting-ip",
        b"true-client-ip",
        b"x-real-ip",
        b"x-client-ip",
        b"forwarded",
        b"cf-ipcountry",
        b"expect",
    }
)
# Like nginx: our own server stamps Date and Server, so passing the provider's would repeat them.
RESPONSE_DROP = frozenset({b"date", b"server"})
# Methods that may be sent again after the exchange broke mid-way (RFC 9110 section 9.2.1).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# And those, or a request with one of IDEMPOTENCY_HEADERS, after a reused connection closed
# before any answer (RFC 9110 section 9.2.2; the headers as Go's net/http reads them).
IDEMPOTENT_METHODS = SAFE_METHODS | {"PUT", "DELETE"}
IDEMPOTENCY_HEADERS = frozenset({b"idempotency-key", b"x-idempotency-key"})
# Cloudflare's answer when the tunnel behind a hostname is not connected (error 1033 and kin):
# the worker never saw the request, so it is a connect failure in all but name.
TUNNEL_DOWN = 530
# A worker's own gateway answering for a service behind it that is down or stuck (cloudflared
# answers 502 when it cannot reach the volunteer's service; a reverse proxy 502 or 504): counted
# as failures, as a connect failure is (Envoy's consecutive gateway failures), and a safe request
# goes to another provider. 503 with Retry-After is a worker saying "later", as a 429 is.
GATEWAY_ERRORS = frozenset({502, 503, 504})
# The path goes on as the client sent it (a %2F is not a "/"); what a request line cannot carry
# or httpx refuses (a "#") is quoted, escapes and these kept (RFC 3986 pchar, "/" and "%").
_PATH_SAFE = "/:@!$&'()*+,;=%"
_NOT_IN_PATH = re.compile(rb"[^\x21-\x7e]|#")
# A "." or ".." segment, its dots escaped or not, "/" or an escaped "/" around it: a server
# that decodes before it resolves them would climb out of the tunnel URL's path.
_DOT_SEGMENT = re.compile(rb"(?:^|/|%2f)(?:\.|%2e){1,2}(?:/|%2f|$)", re.IGNORECASE)
# Answers declaring at most this many bytes are read whole before the client's answer starts.
BUFFERED_ANSWER = 64 * 1024
# ProviderHealth forgets idle entries beyond this many, so churned workers do not pile up.
_MAX_TRACKED = 10_000


@dataclass(frozen=True)
class ProxySettings:
    """Timeouts, ejection, busy and retry limits of the routing proxy."""

    connect_timeout: float = 3.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    pool_timeout: float = 3.0
    eject_after: int = 3  # consecutive connect failures or gateway errors before ejection
    eject_for: float = 30.0  # seconds an ejected provider is skipped
    busy_default: float = 5.0  # seconds a provider answering 429 without Retry-After is skipped
    busy_max: float = 300.0  # cap on Retry-After
    replay_limit: int = 65536  # request bodies up to this size are buffered so they can be retried
    max_attempts: int = 2  # first try + one retry on another provider
    # To all tunnels at once, every one kept alive when idle; to one tunnel, per_origin_limit.
    max_connections: int = 512
    # Seconds an idle connection is kept. A tunnel that closes one first costs little: the pool
    # sees the close before reuse, and an idempotent request that races it goes out again
    # (see `_IDLE_CLOSE_ERRORS`).
    keepalive_expiry: float = 60.0
    # HTTP/2 where a tunnel offers it by ALPN (needs the `h2` package; not yet measured, so off).
    http2: bool = False


@dataclass
class _Health:
    failures: int = 0
    ejected_until: float = -math.inf
    busy_until: float = -math.inf


class ProviderHealth:
    """Per worker: consecutive failures, ejected-until and busy-until, on an injected clock."""

    def __init__(self, settings: ProxySettings, *, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._entries: dict[str, _Health] = {}

    def __len__(self) -> int:
        """How many workers have something remembered (failures, an ejection, a busy mark)."""
        return len(self._entries)

    def status(self, worker_id: str) -> str:
        """`"ejected"`, `"busy"` or `"healthy"` at the current time."""
        entry = self._entries.get(worker_id)
        if entry is None:
            return "healthy"
        now = self._clock()
        if now < entry.ejected_until:
            return "ejected"
        if now < entry.busy_until:
            return "busy"
        return "healthy"

    def available(self, worker_id: str) -> bool:
        """True unless the worker is ejected or busy right now."""
        return self.status(worker_id) == "healthy"

    def failures(self, worker_id: str) -> int:
        """Consecutive failures counted since the worker's last success."""
        entry = self._entries.get(worker_id)
        return entry.failures if entry else 0

    def record_failure(self, worker_id: str) -> bool:
        """Count a failure; True when it ejects the worker (again).

        The count is kept through an ejection, so a provider still down when it returns is
        ejected again by its first failure instead of costing `eject_after` more requests.
        """
        entry = self._entry(worker_id)
        entry.failures += 1
        if entry.failures < self._settings.eject_after:
            return False
        entry.ejected_until = self._clock() + self._settings.eject_for
        return True

    def record_success(self, worker_id: str) -> None:
        """Forget the worker's failures; a busy mark stays (a 429 may race a 200)."""
        entry = self._entries.get(worker_id)
        if entry is None:
            return
        entry.failures = 0
        entry.ejected_until = -math.inf
        if entry.busy_until <= self._clock():
            del self._entries[worker_id]

    def mark_busy(self, worker_id: str, seconds: float) -> None:
        """Skip the worker for `seconds` from now (never shortening an earlier mark)."""
        entry = self._entry(worker_id)
        entry.busy_until = max(entry.busy_until, self._clock() + seconds)

    def _entry(self, worker_id: str) -> _Health:
        entry = self._entries.get(worker_id)
        if entry is None:
            if len(self._entries) >= _MAX_TRACKED:
                self._forget_idle()
            entry = self._entries[worker_id] = _Health()
        return entry

    def _forget_idle(self) -> None:
        now = self._clock()
        idle = [
            wid
            for wid, e in self._entries.items()
            if e.ejected_until <= now and e.busy_until <= now
        ]
        for wid in idle:
            del self._entries[wid]


def upstream_client(settings: ProxySettings) -> TunnelClient:
    """The one client the proxy keeps for the router's life: a bounded pool of kept-alive
    connections per tunnel host, the proxy's timeouts, no redirects and no environment proxies.

    httpx's default pool kept only 20 idle connections: under more concurrent requests than
    that, each answer closed a connection and the next request opened one (a TLS handshake to
    Cloudflare per routed request); its bookkeeping also grew with the square of the pool
    (see edge_router.upstream.pool).
    """
    transport = TunnelTransport(
        max_connections=settings.max_connections,
        keepalive_expiry=settings.keepalive_expiry,
        http2=settings.http2,
    )
    return TunnelClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.write_timeout,
            pool=settings.pool_timeout,
        ),
        follow_redirects=False,
        # HTTP(S)_PROXY in the environment must not reroute traffic meant for the tunnels.
        trust_env=False,
    )


class Proxy:
    """Forwards requests to providers' tunnel URLs, with load-aware choice, retry and ejection."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        settings: ProxySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        # Told (service, seconds) of each answer's head from a worker: the upstream histogram.
        self._observe = observe
        self.health = ProviderHealth(settings, clock=clock)
        self._rng = rng or random.Random()
        self._timeout = httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.write_timeout,
            pool=settings.pool_timeout,
        ).as_dict()
        # httpx files every Set-Cookie of every response in the client's jar. A proxy serving
        # every user must remember none of them (and the jar would grow with every tunnel host).
        client.cookies.jar.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))

    def choose(
        self, providers: Sequence[WorkerRecord], exclude: Collection[str] = ()
    ) -> WorkerRecord | None:
        """The less loaded of two random healthy providers; None when none is healthy.

        Two random choices rather than the least loaded: loads are as old as the last heartbeat,
        and sending everything to the one that looked idle would pile onto it.
        """
        candidates = [
            p
            for p in providers
            if p.live and p.worker_id not in exclude and self.health.available(p.worker_id)
        ]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = self._rng.sample(candidates, 2)
        return first if first.load <= second.load else second

    async def forward(
        self,
        request: Request,
        service: str,
        prefix: str,
        providers: Sequence[WorkerRecord],
        *,
        client_ip: str | None,
        cf_ray: str | None,
    ) -> Response:
        """Proxy `request` to `<tunnel_url>/<path>` of a chosen provider, streaming both ways;
        `<path>` is what follows `prefix` (the route's own part, "/route/ocr") in the request's
        path as the client sent it.

        Raises NoProvider (nothing healthy), UpstreamUnavailable (every try failed) or
        UpstreamTimeout (the provider did not answer in time).
        """
        path = raw_path_after(request.scope, prefix)
        target = target_path(path, request.scope.get("query_string", b""))
        # The server refuses these already (edge_router.server); checked again so that the app
        # never forwards ambiguous framing whatever server runs it.
        problem = header_problem(
            request.headers.raw, str(request.scope.get("http_version", "1.1")).encode("ascii")
        )
        if problem is not None:
            raise BadRequest(problem)
        provider = self.choose(providers)
        if provider is None:
            raise NoProvider(self._nothing_healthy(service, providers))
        headers = request_headers(request, client_ip=client_ip, cf_ray=cf_ray)
        body = await _RequestBody.read(request.stream(), self.settings.replay_limit)
        if not body.replayable:
            length = _declared_length(request.headers.raw)
            if length is not None:
                headers.append((b"content-length", length))
        try:
            return await self._exchange(
                provider, providers, request.method, service, target, headers, body
            )
        finally:
            await body.aclose()

    async def _exchange(
        self,
        provider: WorkerRecord,
        providers: Sequence[WorkerRecord],
        method: str,
        service: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: _RequestBody,
    ) -> Response:
        tried: list[str] = []
        reasons: list[str] = []
        attempts = 0  # tries that reached the network: a skipped record costs none
        while True:
            tried.append(provider.worker_id)
            logger.debug(
                "route %s %s %s -> worker %s (load %.2f, attempt %d)",
                method,
                service,
                target,
                provider.worker_id,
                provider.load,
                attempts + 1,
            )
            started = time.perf_counter()
            response, reason, retry, attempted = await self._attempt(
                provider, method, target, headers, body, earlier=reasons
            )
            if reason is None and response is not None:
                if self._observe is not None:
                    self._observe(service, time.perf_counter() - started)
                return await answer(response, provider.worker_id, broken=self._failed)
            attempts += attempted
            reasons.append(f"worker {provider.worker_id}: {reason}")
            following = None
            if retry and attempts < self.settings.max_attempts:
                following = self.choose(providers, exclude=tried)
                if following is None:
                    reasons.append("no other healthy provider")
            if following is None:
                if response is not None:  # a 429 or 502 no one else can take: the client gets it
                    return relay(response, provider.worker_id)
                raise UpstreamUnavailable(
                    f"no provider of {service!r} answered: {'; '.join(reasons)}"
                )
            if response is not None:
                await response.aclose()
            provider = following

    async def _attempt(
        self,
        provider: WorkerRecord,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: _RequestBody,
        *,
        earlier: Sequence[str],
    ) -> tuple[httpx.Response | None, str | None, bool, bool]:
        """One try: (response, why it failed or None, may another provider be tried, did the
        try reach the network)."""
        wid = provider.worker_id
        before = f" (before that: {'; '.join(earlier)})" if earlier else ""
        trace = _ConnectionTrace()
        try:
            url = upstream_url(provider.tunnel_url, target)
            response = await self._send(url, method, headers, body, trace)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError) as exc:
            # httpx cannot request this record's URL at all (an IDNA error included): nothing
            # was sent, and the next provider is tried as if this one were not listed.
            self._failed(wid, exc)
            return None, f"tunnel URL cannot be requested ({_describe(exc)})", True, False
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self._failed(wid, exc)
            return None, f"connection failed ({_describe(exc)})", body.resendable, True
        except httpx.ReadTimeout as exc:
            # A failure towards ejection, as a gateway's 504 is (Envoy counts its own timeouts
            # so): one slow answer ejects nobody, but a worker that never answers took half
            # its service's requests, a read timeout each, for as long as its lease ran.
            self._failed(wid, exc)
            raise UpstreamTimeout(
                f"worker {wid} did not answer within {self.settings.read_timeout:g} s{before}"
            ) from exc
        except httpx.WriteTimeout as exc:
            raise UpstreamTimeout(
                f"worker {wid} did not take the request body within "
                f"{self.settings.write_timeout:g} s{before}"
            ) from exc
        except httpx.PoolTimeout as exc:
            # Our own connection pool, or this provider's share of it, is full: 503 says "later".
            raise NoProvider(
                f"router connection pool exhausted after {self.settings.pool_timeout:g} s "
                f"while connecting to worker {wid} ({exc}){before}"
            ) from exc
        except httpx.TransportError as exc:
            self._failed(wid, exc)
            if (
                trace.reused
                and not trace.answered
                and isinstance(exc, _IDLE_CLOSE_ERRORS)
                and _idempotent(method, headers)
            ):
                # The provider closed a kept-alive connection as the request went out: its idle
                # timeout won the race, or it took the request and died. Which one cannot be
                # told, so only a request that may run twice goes to another provider.
                why = f"reused connection closed before any answer ({_describe(exc)})"
                return None, why, body.resendable, True
            # The provider took the request and then broke the exchange: it may have acted on it.
            retry = method in SAFE_METHODS and body.resendable
            return None, f"exchange broken ({_describe(exc)})", retry, True
        if response.status_code == TUNNEL_DOWN:
            await response.aclose()
            self._failed(wid, f"HTTP {TUNNEL_DOWN}")
            return None, f"tunnel not connected (HTTP {TUNNEL_DOWN})", body.resendable, True
        later = response.status_code == 503 and "retry-after" in response.headers
        if response.status_code in GATEWAY_ERRORS and not later:
            self._failed(wid, f"HTTP {response.status_code}")
            # The client gets this answer unless another provider takes the request.
            retry = method in SAFE_METHODS and body.resendable
            return response, f"gateway error (HTTP {response.status_code})", retry, True
        if response.status_code == 429 or later:
            busy = retry_after_seconds(
                response.headers.get("retry-after"),
                now=time.time(),  # an HTTP date is wall-clock time, not the monotonic clock
                default=self.settings.busy_default,
                cap=self.settings.busy_max,
            )
            self.health.mark_busy(wid, busy)
            status = response.status_code
            logger.debug("worker %s answered %d: busy for %.1f s", wid, status, busy)
            return response, f"busy ({status}, retry after {busy:g} s)", body.resendable, True
        self.health.record_success(wid)
        return response, None, False, True

    async def _send(
        self,
        url: httpx.URL,
        method: str,
        headers: list[tuple[bytes, bytes]],
        body: _RequestBody,
        trace: _ConnectionTrace,
    ) -> httpx.Response:
        # A bare httpx.Request, not client.build_request: the client's default headers (its
        # Accept-Encoding above all) and cookies must not be added to a client's request.
        upstream = httpx.Request(
            method,
            url,
            headers=headers,
            content=body.content(),
            extensions={"timeout": self._timeout, "trace": trace},
        )
        if isinstance(self.client, TunnelClient):
            return await self.client.forward(upstream)
        return await self.client.send(upstream, stream=True)

    def _failed(self, worker_id: str, cause: BaseException | str) -> None:
        if self.health.record_failure(worker_id):
            logger.warning(
                "ejecting worker %s for %g s after %d consecutive failures (last: %s)",
                worker_id,
                self.settings.eject_for,
                self.health.failures(worker_id),
                cause if isinstance(cause, str) else _describe(cause),
            )
        else:
            logger.debug("worker %s failed: %s", worker_id, cause)

    def _nothing_healthy(self, service: str, providers: Sequence[WorkerRecord]) -> str:
        if not providers:
            return f"no provider of {service!r} is registered"
        states = [
            "tombstoned" if not p.live else self.health.status(p.worker_id) for p in providers
        ]
        counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
        return f"no healthy provider of {service!r} ({len(providers)} known: {counts})"


def _idempotent(method: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """May the request run twice: an idempotent method, or an Idempotency-Key header?"""
    return method in IDEMPOTENT_METHODS or any(n in IDEMPOTENCY_HEADERS for n, _ in headers)


# What a reused connection that the provider had closed fails with, before any answer: httpcore
# reads the close as "Server disconnected without sending a response" (a RemoteProtocolError), a
# reset as a ReadError; a WriteError shows when the close came mid-request.
_IDLE_CLOSE_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class _ConnectionTrace:
    """httpcore's trace events of one try: whether it opened a connection or reused an idle
    one, and whether the provider's answer had begun."""

    def __init__(self) -> None:
        self.connected = False
        self.answered = False

    @property
    def reused(self) -> bool:
        """True when the try went out on a kept-alive connection from the pool."""
        return not self.connected

    async def __call__(self, event: str, info: Mapping[str, Any]) -> None:
        if event.startswith(("connection.connect_tcp.", "connection.connect_unix_socket.")):
            self.connected = True
        elif event.endswith(".receive_response_headers.complete"):
            self.answered = True


class _RequestBody:
    """The request body: whole bytes when it fits `replay_limit`, else a one-shot stream."""

    def __init__(self, prefix: list[bytes], rest: AsyncGenerator[bytes, None] | None) -> None:
        self._prefix = prefix
        self._rest = rest
        self.started = False  # has any byte of a streamed body been handed to httpx?

    @classmethod
    async def read(cls, stream: AsyncGenerator[bytes, None], limit: int) -> _RequestBody:
        """Read up to `limit` bytes; stop there and keep the rest of `stream` for streaming."""
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return cls(chunks, None)
            chunks.append(chunk)
            size += len(chunk)
        return cls(chunks, stream)

    @property
    def replayable(self) -> bool:
        """True when the whole body is in memory and can be sent again."""
        return self._rest is None

    @property
    def resendable(self) -> bool:
        """True when another provider can still get the whole body: buffered, or not yet read."""
        return self._rest is None or not self.started

    def content(self) -> bytes | AsyncIterator[bytes]:
        """What httpx sends: the buffered bytes, or an iterator over the stream."""
        if self._rest is None:
            return b"".join(self._prefix)
        return self._stream(self._rest)

    async def _stream(self, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
        self.started = True
        for chunk in self._prefix:
            yield chunk
        self._prefix = []
        async for chunk in rest:
            yield chunk

    async def aclose(self) -> None:
        """Close the client's stream if it was not read to the end."""
        if self._rest is not None:
            await self._rest.aclose()


# Told (worker id, error) when a provider breaks off an answer: the proxy counts a failure.
Broken = Callable[[str, BaseException], None]


class _UpstreamResponse(StreamingResponse):
    """Streams a provider's raw response bytes and always closes it, even if the client leaves.

    One the provider breaks off ends without its last message (which would make a chunked
    answer look complete), and notes BROKEN_OFF in the scope: the connection is then aborted
    (edge_router.accounting), without a traceback.
    """

    def __init__(
        self,
        upstream: httpx.Response,
        headers: list[tuple[bytes, bytes]],
        worker_id: str,
        broken: Broken | None,
    ) -> None:
        self._body = self._relay(upstream)
        super().__init__(self._body, status_code=upstream.status_code)
        self.raw_headers = headers
        self._upstream = upstream
        self._worker_id = worker_id
        self._on_break = broken
        self._broken: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def until_broken(message: Message) -> None:
            if self._broken is None:
                await send(message)

        # Closing in `finally` rather than in a BackgroundTask: a background task does not run
        # when the client disconnects, and the provider's connection would never go back.
        try:
            await super().__call__(scope, receive, until_broken)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()
                await self._upstream.aclose()
        if self._broken is not None:
            scope[BROKEN_OFF] = self._broken

    async def _relay(self, upstream: httpx.Response) -> AsyncGenerator[bytes, None]:
        sent = 0
        try:
            async for chunk in upstream.aiter_raw():
                sent += len(chunk)
                yield chunk
        except httpx.TransportError as exc:
            # Too late for an error status: the client must see a truncated answer, not one
            # that looks complete (see the class).
            why = f"worker {self._worker_id} broke off its answer after {sent} bytes"
            self._broken = f"{why} ({_describe(exc)})"
            logger.info("%s", self._broken)
            if self._on_break is not None:
                self._on_break(self._worker_id, exc)


async def answer(
    upstream: httpx.Response, worker_id: str, *, broken: Broken | None = None
) -> Response:
    """The client's response to a provider's answer: read whole when it declares a length up
    to BUFFERED_ANSWER, streamed otherwise (see `relay`).

    A small answer read at once needs no streaming machinery (a task group and a disconnect
    listener per response, about a fifth of a routed request's CPU), and a provider that
    breaks it off gets the client a 502 instead of a truncated answer.
    """
    length = upstream.headers.get("content-length", "")
    if not (length.isdigit() and int(length) <= BUFFERED_ANSWER):
        return relay(upstream, worker_id, broken=broken)
    try:
        body = b"".join([chunk async for chunk in upstream.aiter_raw()])
    except httpx.TransportError as exc:
        if broken is not None:
            broken(worker_id, exc)
        why = f"worker {worker_id} broke off its answer ({_describe(exc)})"
        raise UpstreamUnavailable(why) from exc
    finally:
        await upstream.aclose()
    headers = response_headers(upstream.headers.raw)
    headers.append((WORKER_HEADER, worker_id.encode("ascii")))
    response = Response(body, status_code=upstream.status_code)
    response.raw_headers = headers  # the provider's, Content-Length included
    return response


def relay(upstream: httpx.Response, worker_id: str, *, broken: Broken | None = None) -> Response:
    """The client's response: the provider's status, end-to-end headers and raw body; `broken`
    is told when the provider breaks the body off."""
    headers = response_headers(upstream.headers.raw)
    headers.append((WORKER_HEADER, worker_id.encode("ascii")))
    return _UpstreamResponse(upstream, headers, worker_id, broken)


def request_headers(
    request: Request, *, client_ip: str | None, cf_ray: str | None
) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers of `request`, with X-Forwarded-* and CF-Ray set for the provider."""
    raw = request.headers.raw
    drop = HOP_BY_HOP | REQUEST_DROP | connection_tokens(raw)
    out = [(k, v) for k, v in raw if k not in drop and not k.startswith(INTERNAL_PREFIX)]
    # Only the address the router resolved (the TCP peer, or what a trusted proxy vouched for):
    # a chain the client sent cannot be checked, and a provider must not be led to trust it.
    if client_ip:
        out.append((b"x-forwarded-for", client_ip.encode("latin-1")))
    out.append((b"x-forwarded-proto", str(request.scope.get("scheme", "http")).encode("latin-1")))
    host = request.headers.get("host")
    if host:
        out.append((b"x-forwarded-host", host.encode("latin-1")))
    if cf_ray:
        out.append((b"cf-ray", cf_ray.encode("latin-1")))
    return out


def _declared_length(raw: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The Content-Length a request declares, in canonical digits; None when it has none.

    For a request the server has framed already (edge_router.framing refuses conflicting
    values): what is not plain digits is not passed on.
    """
    for name, value in raw:
        if name.lower() == b"content-length":
            digits = value.split(b",")[0].strip()
            return str(int(digits)).encode("ascii") if digits.isdigit() else None
    return None


def response_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A provider's response headers without hop-by-hop, Date/Server and our internal ones."""
    return [(k, v) for k, v in end_to_end(raw, RESPONSE_DROP) if not k.startswith(INTERNAL_PREFIX)]


def raw_path_after(scope: Scope, prefix: str) -> bytes:
    """What follows `prefix` (decoded, as the route matched it) in the path as the client sent
    it. Raises BadRequest when the prefix itself came percent-encoded: what follows could not
    be told apart from it."""
    raw = scope.get("raw_path")
    if raw is None:  # a server that gives none: the decoded path, quoted back
        raw = quote(scope["path"], safe=_PATH_SAFE.replace("%", "")).encode("ascii")
    start = (scope.get("root_path", "") + prefix).encode()
    if not raw.startswith(start) or raw[len(start) : len(start) + 1] not in (b"", b"/"):
        raise BadRequest(f"the path must begin with {prefix!r} as such, not percent-encoded")
    return bytes(raw[len(start) :])


def target_path(path: bytes, query: bytes) -> bytes:
    """`/<path>?<query>` to append to a tunnel URL; `path` is raw (from `raw_path_after`).

    Raises BadRequest for `.` and `..` segments, escaped or not, which would climb out of the
    tunnel URL's path.
    """
    if _DOT_SEGMENT.search(path):
        raise BadRequest(f"path {path.decode('latin-1')!r} contains a '.' or '..' segment")
    if _NOT_IN_PATH.search(path):
        path = quote(path, safe=_PATH_SAFE).encode("ascii")
    target = b"/" + path.lstrip(b"/")
    return target + b"?" + query if query else target


# Parsing the tunnel URL and joining the path cost a routed request 7% of its CPU; the same few
# tunnels and paths come again and again, and URLs are immutable.
@functools.lru_cache(maxsize=4096)
def upstream_url(tunnel_url: str, target: bytes) -> httpx.URL:
    """The tunnel URL with `target` (from `target_path`) appended to its own path."""
    base = httpx.URL(tunnel_url)
    prefix = base.raw_path.split(b"?", 1)[0].rstrip(b"/")
    return base.copy_with(raw_path=prefix + target)


def retry_after_seconds(value: str | None, *, now: float, default: float, cap: float) -> float:
    """Seconds a Retry-After header asks for (delta seconds or HTTP date), within [0, cap].

    `now` is wall-clock time, for dates; a missing or unreadable value gives `default`.
    """
    if value is None:
        return min(default, cap)
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return min(default, cap)
    if when.tzinfo is None:  # "-0000": RFC 5322 for UTC; a naive datetime would mean local time
        when = when.replace(tzinfo=datetime.UTC)
    return min(max(when.timestamp() - now, 0.0), cap)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = [
    "BUFFERED_ANSWER",
    "ProviderHealth",
    "Proxy",
    "ProxySettings",
    "answer",
    "raw_path_after",
    "relay",
    "request_headers",
    "response_headers",
    "retry_after_seconds",
    "target_path",
    "upstream_client",
    "upstream_url",
]
