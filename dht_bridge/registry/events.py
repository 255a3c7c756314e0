"""The registry's events channel as an async iterator, on one Redis, Sentinel or Cluster.

On one Redis (or a Sentinel-managed primary) it is plain pub/sub through the client's pool. On a
Cluster it is sharded pub/sub: SSUBSCRIBE on the primary of the channel's slot, which is the
slot of every registry key (one hash tag), so the scripts SPUBLISH there. After a failover the
subscription fails (connection lost, or the server unsubscribes us because the slot moved), the
caller subscribes again, and the new subscription finds the new primary.

Also here: which redis-py errors mean "Redis is not there", shared with the registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dht_bridge.errors import RegistryError, RegistryUnavailable
from dht_bridge.registry.topology import initialize_cluster

log = logging.getLogger(__name__)

Event = dict[str, Any]
EVENT_POLL_SECONDS = 1.0

# What counts as "Redis is not there": a refused or dropped connection, a socket timeout, our
# own deadline, and what a failover answers meanwhile (a Cluster without a primary for the slot,
# a demoted primary refusing writes, a slot map being rebuilt). Anything else from redis-py is a
# RegistryError.
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    RedisClusterException,
)


def leaked_transport_error(exc: BaseException) -> bool:
    """An AttributeError or TypeError raised inside redis-py's connection code: what it leaks
    instead of ConnectionError when a connection is closed under it (redis-py issue 4287, and
    concurrent Cluster map reloads). Our own bugs raise elsewhere and are not matched."""
    if not isinstance(exc, AttributeError | TypeError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    return "/redis/" in filename or ("/asyncio/" in filename and _through_redis(exc))


def _through_redis(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if "/redis/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False


class PubSubOpener:
    """Opens the pub/sub connection of one subscription and closes what it opened."""

    sharded = False

    async def open(self) -> PubSub:
        """A PubSub, not yet subscribed."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close whatever `open` created besides the PubSub."""


class PlainPubSubOpener(PubSubOpener):
    """Plain pub/sub on the client's own pool (one Redis, or the Sentinel-managed primary)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    async def open(self) -> PubSub:
        """A PubSub on the client's pool."""
        return self._client.pubsub()


class ShardPubSubOpener(PubSubOpener):
    """Sharded pub/sub on the primary that serves `channel`'s slot, found through the cluster."""

    sharded = True

    def __init__(self, cluster: RedisCluster, channel: str) -> None:
        self._cluster = cluster
        self._channel = channel
        self._node_client: aioredis.Redis | None = None

    async def open(self) -> PubSub:
        """A PubSub on a connection of its own to the slot's current primary."""
        # A keyed command checks the slot map: when the primary is gone it fails, and the
        # cluster client reloads the map before its next command (the next subscription).
        await initialize_cluster(self._cluster)
        await self._cluster.exists(self._channel)
        node = self._cluster.get_node_from_key(self._channel)
        if node is None:
            raise RegistryUnavailable("no Cluster node serves the events channel's slot")
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, **node.connection_kwargs
        )
        self._node_client = aioredis.Redis.from_pool(pool)
        return self._node_client.pubsub()

    async def aclose(self) -> None:
        """Close the connection to the node."""
        if self._node_client is not None:
            client, self._node_client = self._node_client, None
            await client.aclose()


class EventSubscription:
    """Decoded events from the events channel, as an async iterator; close it with `aclose()`.

    When the connection drops (or the channel's slot moves to another Cluster node), iteration
    raises RegistryUnavailable; iterating again reconnects and resubscribes (events published
    meanwhile are lost, as with any pub/sub).
    """

    def __init__(self, opener: PubSubOpener, channel: str, *, timeout: float) -> None:
        self._opener = opener
        self._pubsub: PubSub | None = None
        self._channel = channel
        self._timeout = timeout
        self._closed = False

    async def start(self) -> None:
        """Subscribe now, so that no event published after this returns is missed."""
        if self._pubsub is not None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                pubsub = await self._opener.open()
                self._pubsub = pubsub
                if self._opener.sharded:
                    await pubsub.ssubscribe(self._channel)
                else:
                    await pubsub.subscribe(self._channel)
        except UNAVAILABLE as exc:
            await self._drop()
            raise RegistryUnavailable(
                f"cannot subscribe to events: {describe(exc, self._timeout)}"
            ) from exc
        except RedisError as exc:
            await self._drop()
            raise RegistryError(f"cannot subscribe to events: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            await self._drop()
            if not leaked_transport_error(exc):
                raise
            raise RegistryUnavailable(f"cannot subscribe to events: {exc!r}") from exc

    async def _drop(self) -> None:
        """Forget a connection that failed, so that the next start opens a new one."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            # Typed from redis-py 8.2 on, untyped before: Any keeps mypy quiet on both.
            closing: Any = pubsub.aclose
            await closing()
        await self._opener.aclose()

    async def aclose(self) -> None:
        """Unsubscribe and give the connection back."""
        if not self._closed:
            self._closed = True
            await self._drop()

    async def __aenter__(self) -> EventSubscription:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> EventSubscription:
        return self

    async def get(self) -> Event | None:
        """The next event, or None when none came within the poll window (about a second).

        For loops that must also watch a stop flag: cancelling a task blocked in a redis-py
        pubsub read is not reliably delivered on Python 3.11, so such loops poll instead.
        """
        await self.start()
        return decode_event(await self._next_message())

    async def __anext__(self) -> Event:
        await self.start()
        while not self._closed:
            event = decode_event(await self._next_message())
            if event is not None:
                return event
        raise StopAsyncIteration

    async def _next_message(self) -> Any:
        assert self._pubsub is not None, "start() subscribes first"
        try:
            # A bounded read (None when nothing came) rather than an endless one: the caller's
            # loop stays responsive to cancellation, and a hung server is noticed.
            message = await self._pubsub.get_message(timeout=EVENT_POLL_SECONDS)
        except UNAVAILABLE as exc:
            # The next read opens a new connection, on whichever node serves the channel then.
            await self._drop()
            reason = describe(exc, self._timeout)
            raise RegistryUnavailable(f"events connection lost: {reason}") from exc
        except RedisError as exc:
            await self._drop()
            raise RegistryError(f"events subscription failed: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            await self._drop()
            if not leaked_transport_error(exc):
                raise
            raise RegistryUnavailable(f"events connection lost: {exc!r}") from exc
        if message is None:
            return None
        kind = message.get("type")
        if kind in (b"sunsubscribe", "sunsubscribe") and not self._closed:
            # The server ends a shard subscription when the slot moves (a Cluster failover or
            # resharding): subscribe again on the slot's new primary.
            await self._drop()
            raise RegistryUnavailable("events channel moved to another Cluster node")
        if kind not in ("message", "smessage", b"message", b"smessage"):
            return None  # subscribe confirmations and the like
        return message.get("data")


def decode_event(data: Any) -> Event | None:
    """A JSON object event, or None (logged) for anything else."""
    if not isinstance(data, bytes | str):
        return None
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring an event that is not JSON: %.80r", data)
        return None
    if not isinstance(event, dict):
        log.warning("ignoring an event that is not a JSON object: %.80r", data)
        return None
    return event


def describe(exc: BaseException, timeout: float) -> str:
    """A short reason for a Redis failure, for RegistryUnavailable messages."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return f"no answer within {timeout:g} s"
    return str(exc) or type(exc).__name__


__all__ = [
    "EVENT_POLL_SECONDS",
    "UNAVAILABLE",
    "Event",
    "EventSubscription",
    "PlainPubSubOpener",
    "PubSubOpener",
    "ShardPubSubOpener",
    "decode_event",
    "describe",
    "leaked_transport_error",
]
