"""Which Redis the registry talks to: one server, a Sentinel-managed primary, or a Cluster.

`RMA_REDIS_URL` names it (DESIGN.md, "In Redis"; README, "Deployment"):

- `redis://[user:password@]host:port/db`, `rediss://...` (TLS), `unix:///path/redis.sock`: one
  server. With `RMA_REDIS_CLUSTER=1`, a `redis://`/`rediss://` URL is a Cluster seed instead.
- `redis+sentinel://[user:password@]host:26379,host2:26379/mymaster/0`: the primary that the
  Sentinels at those addresses name `mymaster`, database 0 (`rediss+sentinel://` for TLS to the
  data nodes; the password is the data nodes'; `?sentinel_password=` for the Sentinels').
- `redis+cluster://[user:password@]host:7000,host2:7001`: a Cluster, through any of those seeds
  (`rediss+cluster://` for TLS).

This module parses that and builds the redis-py client; the registry itself does not care which
one it got, except for the key prefix (hash-tagged on Cluster) and the pub/sub flavour.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from dht_bridge.errors import ConfigError
from dht_bridge.options import format_hostport

log = logging.getLogger(__name__)

RedisClient = aioredis.Redis | RedisCluster
Closer = Callable[[], Awaitable[None]]

DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
# Connections to one server. The single-server pool blocks beyond this (within the timeout)
# instead of failing with "Too many connections", which turned 200 workers leaving together
# into 503s.
MAX_CONNECTIONS = 128
# A Cluster node's pool cannot block: it raises at its cap. The cap is set far above any burst
# we expect (Redis accepts 10,000 clients by default) so a burst waits on Redis, not fails here.
CLUSTER_MAX_CONNECTIONS = 4096
SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class Topology(enum.Enum):
    """How the Redis behind the URL is deployed."""

    SINGLE = "single"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class RedisTarget:
    """A parsed `RMA_REDIS_URL`: what to connect to, without opening anything."""

    topology: Topology
    url: str  # the URL as given (single server: handed to redis-py as is)
    hosts: tuple[tuple[str, int], ...] = ()  # Sentinels or Cluster seeds
    service_name: str = ""  # the Sentinel master's name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: bool = False

    def describe(self) -> str:
        """For logs: the topology and addresses, never a password."""
        if self.topology is Topology.SINGLE:
            parts = urlsplit(self.url)
            where = parts.hostname or parts.path
            return f"one Redis at {where}" + (f":{parts.port}" if parts.port else "")
        hosts = ",".join(format_hostport(host, port) for host, port in self.hosts)
        if self.topology is Topology.SENTINEL:
            return f"Sentinel master {self.service_name!r} (db {self.db}) via {hosts}"
        return f"Redis Cluster via {hosts}"


def parse_redis_url(url: str, *, cluster: bool = False) -> RedisTarget:
    """Parse `RMA_REDIS_URL`; `cluster` (`RMA_REDIS_CLUSTER`) makes a redis:// URL a seed.

    Raises ConfigError naming what is wrong; nothing is connected.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in SINGLE_SCHEMES:
        if not cluster:
            return RedisTarget(Topology.SINGLE, url, tls=scheme == "rediss")
        if scheme == "unix":
            raise ConfigError("RMA_REDIS_CLUSTER needs a redis:// or rediss:// seed, not unix://")
        scheme = f"{scheme}+cluster"
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        schemes = SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
        known = ", ".join(f"{name}://" for name in schemes)
        # The scheme alone: the rest of a URL may hold a password.
        given = f"not {parts.scheme}://" if parts.scheme else "and has none"
        raise ConfigError(f"RMA_REDIS_URL must start with one of {known}, {given}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    default_port = DEFAULT_SENTINEL_PORT if scheme in SENTINEL_SCHEMES else DEFAULT_REDIS_PORT
    hosts = tuple(_host_port(item, default_port) for item in hostlist.split(",") if item)
    if not hosts:
        raise ConfigError(f"RMA_REDIS_URL names no host: {_redacted(url)}")
    query = parse_qs(parts.query)
    tls = scheme.startswith("rediss")
    if scheme in CLUSTER_SCHEMES:
        if parts.path.strip("/") not in ("", "0"):
            raise ConfigError("a Redis Cluster has database 0 only; drop the /db from the URL")
        return RedisTarget(
            Topology.CLUSTER, url, hosts, username=username, password=password, tls=tls
        )
    service_name, db = _sentinel_path(parts.path)
    sentinel_password = query.get("sentinel_password", [None])[0]
    return RedisTarget(
        Topology.SENTINEL,
        url,
        hosts,
        service_name=service_name,
        db=db,
        username=username,
        password=password,
        sentinel_password=sentinel_password,
        tls=tls,
    )


def open_client(target: RedisTarget, timeout: float) -> tuple[RedisClient, list[Closer]]:
    """A client for `target`, and what must be closed besides it (the Sentinel connections).

    No client retries a command: a Redis that is down must show as unavailable within
    `timeout`, and the router and bridge have their own fallbacks (cache, DHT, journal). Each
    client still reconnects by itself on a later command: the single-server pool replaces
    broken connections, the Sentinel pool asks the Sentinels for the primary on every new
    connection, and the Cluster client reloads its slot map after a failed command.
    """
    try:
        if target.topology is Topology.SINGLE:
            return _single(target, timeout), []
        if target.topology is Topology.CLUSTER:
            return _cluster(target, timeout), []
        return _sentinel(target, timeout)
    except ValueError as exc:
        raise ConfigError(f"RMA_REDIS_URL is not a valid Redis URL: {exc}") from exc


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _single(target: RedisTarget, timeout: float) -> aioredis.Redis:
    # A blocking pool: a burst beyond its size waits (within the timeout) for a connection.
    pool = aioredis.BlockingConnectionPool.from_url(
        target.url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=_no_retry(),
        retry_on_error=[],
    )
    return aioredis.Redis.from_pool(pool)


def _cluster(target: RedisTarget, timeout: float) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        max_connections=CLUSTER_MAX_CONNECTIONS,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # After a failed command the client reloads the slot map before its next one; no
        # retry of the command itself.
        retry=_no_retry(),
    )


def _sentinel(target: RedisTarget, timeout: float) -> tuple[aioredis.Redis, list[Closer]]:
    timeouts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _no_retry(),
    }
    # Typed from redis-py 8.2 on, untyped before: Any keeps mypy quiet on both.
    sentinel_class: Any = Sentinel
    sentinel = sentinel_class(
        list(target.hosts),
        sentinel_kwargs={**timeouts, "password": target.sentinel_password},
        **timeouts,
    )
    # Every new connection asks the Sentinels for the primary's address, and the pool drops
    # its idle connections when that address changes: a failover needs nothing from us.
    client: aioredis.Redis = sentinel.master_for(
        target.service_name,
        db=target.db,
        ssl=target.tls,
        username=target.username,
        password=target.password,
        retry_on_error=[],
    )
    return client, [sentinel_client.aclose for sentinel_client in sentinel.sentinels]


# One lock per event loop: Cluster clients of one loop initialise one after the other.
_INIT_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def initialize_cluster(client: RedisCluster) -> None:
    """Load the slot map of a fresh Cluster client, one client of this loop at a time.

    redis-py 8.1 breaks connections when two Cluster clients of one event loop load their maps
    at the same moment (measured: a few of 50 concurrent first commands fail with an
    AttributeError from its connection code); loading each map before first use avoids that.
    A no-op once the map is loaded.
    """
    loop = asyncio.get_running_loop()
    lock = _INIT_LOCKS.setdefault(loop, asyncio.Lock())
    async with lock:
        await client.initialize()


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    text = item.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"RMA_REDIS_URL: {item!r} is not host:port") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"RMA_REDIS_URL: {item!r} is not host:port")
    return host, port


def _sentinel_path(path: str) -> tuple[str, int]:
    pieces = [piece for piece in path.split("/") if piece]
    if not pieces or len(pieces) > 2:
        raise ConfigError(
            "a Sentinel URL names the master and optionally the database: "
            "redis+sentinel://host:26379,host2:26379/mymaster/0"
        )
    try:
        db = int(pieces[1]) if len(pieces) == 2 else 0
    except ValueError:
        raise ConfigError(f"RMA_REDIS_URL: database {pieces[1]!r} is not a number") from None
    return unquote(pieces[0]), db


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)


__all__ = [
    "RedisClient",
    "RedisTarget",
    "Topology",
    "initialize_cluster",
    "open_client",
    "parse_redis_url",
]
