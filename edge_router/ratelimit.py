"""Requests per client address: registration, routing, admin and topology reads, each limited.

The client address is the one `ClientResolver.client_ip` believes (CF-Connecting-IP only from a
trusted proxy, X-Forwarded-For only with the Worker's secret, otherwise the TCP peer); IPv6
clients are counted per /64, the block one subscriber gets. Loopback clients (this host's own
tools, the demo, benchmarks) are not limited.

Registration, admin and topology reads are rare and costly (a signature check and a Redis write,
a token guess, a 5,000-record scan), so their windows live in the registry's Redis and every
replica sees one count. Routing is the edge's hot path: a Redis round trip per routed request
would add its latency and a Redis command to each one, so each replica counts its own clients in
memory (a client spread over N replicas gets up to N times the limit; see docs/design.md).

A refused client is remembered by the replica until its Retry-After, so that a flood from it
costs nothing more in Redis. A Redis that fails never fails a request: the shared classes then
count in this replica's memory for `DOWN_RETRY_SECONDS` before Redis is tried again (one warning
per outage, every failure counted in `RateStats.storage_failures`).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

from cachetools import TLRUCache
from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from dht_bridge.options import format_hostport
from dht_bridge.registry.topology import (
    DEFAULT_REDIS_PORT,
    MAX_CONNECTIONS,
    Topology,
    parse_redis_url,
)
from dht_bridge.settings import RegistrySettings
from edge_router.cloudflare import ClientResolver
from edge_router.config import RATE_OFF, RateSettings
from edge_router.errors import RateLimited, error_response
from edge_router.windows import LocalWindows

logger = logging.getLogger(__name__)

__all__ = [
    "DOWN_RETRY_SECONDS",
    "KEY_PREFIX",
    "RateClass",
    "RateLimit",
    "RateLimiter",
    "RateStats",
    "client_key",
    "rate_class",
    "storage_uri",
]

# After a Redis failure, the shared classes count in memory this long before Redis is tried
# again: a Redis that times out costs one timeout per this many seconds, not one per request.
DOWN_RETRY_SECONDS = 5.0
# Keys the windows take in the registry's Redis (beside the registry's own `rma:` keys).
KEY_PREFIX = "rma:ratelimit"
MEMORY_URI = "async+memory://"
# Clients refused, remembered by this replica until their Retry-After: a flooding client costs
# no further Redis command until then. Bounded, so a flood from many addresses cannot grow it.
REFUSED_SIZE = 65536
IPV6_CLIENT_PREFIX = 64


class RateClass(enum.Enum):
    """What a request is counted as; the value names it in keys and in RMA_RATE_*."""

    REGISTER = "register"
    ROUTE = "route"
    ADMIN = "admin"
    TOPOLOGY = "topology"


# Counted by each replica in memory (the hot path); the others are shared through Redis.
LOCAL_CLASSES = frozenset({RateClass.ROUTE})


def rate_class(method: str, path: str) -> RateClass | None:
    """The class a request is limited in, or None for the unlimited ones (lookups, probes)."""
    if path.startswith("/route/"):
        return RateClass.ROUTE
    if path == "/workers" or path.startswith("/workers/"):
        return RateClass.REGISTER if method in ("POST", "DELETE") else None
    if path.startswith("/admin/"):
        return RateClass.ADMIN
    if path in ("/topology", "/metrics"):
        return RateClass.TOPOLOGY
    return None


# Parsed once per address (a routed request parsed its client's address every time).
@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str | None:
    """What a client is counted by: its IPv4 address or its IPv6 /64; None for loopback and
    for text that is no address (never limited: nothing to count it by)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


def storage_uri(settings: RegistrySettings) -> tuple[str, dict[str, Any]]:
    """The `limits` storage URI and options for the registry's Redis (RMA_REDIS_URL's forms);
    memory when the registry is the embedded one. Raises ConfigError for a bad URL."""
    if settings.redis_url is None:
        return MEMORY_URI, {}
    target = parse_redis_url(settings.redis_url, cluster=settings.cluster)
    timeouts: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        # A down Redis must fail fast: no retries of a command (the registry's client agrees).
        "retry": Retry(NoBackoff(), 0),
    }
    options: dict[str, Any] = {
        "implementation": "redispy",  # redis-py is installed already; coredis is not
        "key_prefix": KEY_PREFIX,
        "wrap_exceptions": True,
        **timeouts,
    }
    if target.topology is not Topology.CLUSTER:
        # As the registry's pool: a burst of checks must not open a connection each.
        options["max_connections"] = MAX_CONNECTIONS
    if target.topology is Topology.SINGLE:
        parts = urlsplit(target.url)
        if parts.scheme.lower() == "unix":
            # `limits` hands redis-py this URL with the "async+redis+" taken off again.
            return "async+redis+unix" + target.url[len("unix") :], options
        netloc = parts.netloc
        if parts.port is None and parts.hostname:
            netloc += f":{DEFAULT_REDIS_PORT}"  # `limits` wants a port in every location
        return urlunsplit(parts._replace(scheme=f"async+{parts.scheme}", netloc=netloc)), options
    hosts = ",".join(format_hostport(h, p) for h, p in target.hosts)
    credentials = {"username": target.username, "password": target.password}
    options.update({k: v for k, v in credentials.items() if v is not None})
    if target.tls:
        options["ssl"] = True
    if target.topology is Topology.CLUSTER:
        return f"async+redis+cluster://{hosts}", options
    options["db"] = target.db
    # The Sentinels' own password (if any), never the data nodes' credentials.
    options["sentinel_kwargs"] = {**timeouts, "password": target.sentinel_password}
    return f"async+redis+sentinel://{hosts}/{quote(target.service_name, safe='')}", options


@dataclass
class RateStats:
    """Counters: requests refused per class, and failed calls to the shared storage."""

    limited: dict[str, int] = field(default_factory=dict)
    storage_failures: int = 0


class RateLimiter:
    """The windows of every class, per client key: shared ones in the registry's Redis (or in
    memory for the embedded registry), routing in this replica's memory."""

    def __init__(
        self,
        rates: RateSettings,
        registry: RegistrySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._items: dict[RateClass, list[RateLimitItem]] = {}
        for klass in RateClass:
            text = getattr(rates, klass.value)
            if text.strip().lower() != RATE_OFF:
                self._items[klass] = parse_many(text)
        self._clock = clock
        longest = max((i.get_expiry() for items in self._items.values() for i in items), default=1)
        self._local = LocalWindows(longest=longest, clock=clock)
        uri, options = storage_uri(registry)
        self._shared_storage: Storage | None = None
        self._shared: SlidingWindowCounterRateLimiter | None = None
        if uri != MEMORY_URI and any(k not in LOCAL_CLASSES for k in self._items):
            self._shared_storage = cast(Storage, storage_from_string(uri, **options))
            self._shared = SlidingWindowCounterRateLimiter(self._shared_storage)
        self._timeout = registry.timeout
        self._down_until: float | None = None
        # (class, key) -> until when it is refused: each entry expires at its own deadline.
        self._refused: TLRUCache[tuple[RateClass, str], float] = TLRUCache(
            REFUSED_SIZE, ttu=lambda _key, until, _now: until, timer=clock
        )
        self.stats = RateStats()

    async def check(self, klass: RateClass, key: str) -> int | None:
        """Count one request of `key` in `klass`: None when it may go on, else the seconds it
        should wait (for Retry-After)."""
        items = self._items.get(klass)
        if not items:
            return None
        until = self._refused.get((klass, key))
        if until is not None:
            self._count_limited(klass)
            return max(1, math.ceil(until - self._clock()))
        shared = self._shared
        if shared is None or klass in LOCAL_CLASSES or self._shared_down():
            wait = self._local.hit(items, klass, key)
        else:
            try:
                async with asyncio.timeout(self._timeout):
                    wait = await _shared_hit(shared, items, klass, key)
            except (StorageError, RedisError, OSError, TimeoutError) as exc:
                self._storage_failed(exc)
                wait = self._local.hit(items, klass, key)
            else:
                if self._down_until is not None:
                    self._down_until = None
                    logger.info("rate limits: Redis answers again; windows are shared again")
        if wait is not None:
            self._refused[(klass, key)] = self._clock() + wait
            self._count_limited(klass)
        return wait

    def _count_limited(self, klass: RateClass) -> None:
        self.stats.limited[klass.value] = self.stats.limited.get(klass.value, 0) + 1

    def _shared_down(self) -> bool:
        return self._down_until is not None and self._clock() < self._down_until

    def _storage_failed(self, exc: BaseException) -> None:
        self.stats.storage_failures += 1
        if self._down_until is None:
            # Once per outage: every request would log it otherwise.
            logger.warning(
                "rate limits: Redis failed (%r); counting in this replica's memory, "
                "trying Redis again every %.0f s",
                exc,
                DOWN_RETRY_SECONDS,
            )
        self._down_until = self._clock() + DOWN_RETRY_SECONDS

    async def aclose(self) -> None:
        """Close the connections to the shared storage."""
        # `limits` 5.8 has no close: its redis-py bridge holds the clients (and Sentinels).
        bridge = getattr(self._shared_storage, "bridge", None)
        clients = [getattr(bridge, "storage", None), getattr(bridge, "storage_replica", None)]
        sentinel = getattr(bridge, "sentinel", None)
        clients.extend(getattr(sentinel, "sentinels", ()))
        for client in clients:
            if client is not None:
                await client.aclose()


async def _shared_hit(
    limiter: SlidingWindowCounterRateLimiter,
    items: list[RateLimitItem],
    klass: RateClass,
    key: str,
) -> int | None:
    for item in items:
        if not await limiter.hit(item, klass.value, key):
            stats = await limiter.get_window_stats(item, klass.value, key)
            # `limits` tells the wall-clock time its window takes one more.
            return max(1, math.ceil(stats.reset_time - time.time()))
    return None


class RateLimit:
    """ASGI middleware: answers 429 with Retry-After, in the router's error format, to a client
    over its class's limit; every other request passes untouched."""

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, resolver: ClientResolver) -> None:
        self.app = app
        self.limiter = limiter
        self.resolver = resolver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            klass = rate_class(scope["method"], scope["path"])
            address = self.resolver.client_ip(Request(scope)) if klass is not None else None
            key = client_key(address) if address else None
            if klass is not None and key is not None:
                wait = await self.limiter.check(klass, key)
                if wait is not None:
                    refused = RateLimited(f"too many {klass.value} requests; retry in {wait} s")
                    response = error_response(refused, headers={"Retry-After": str(wait)})
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
