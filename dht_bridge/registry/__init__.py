"""The Redis registry: what the edge reads. Records are upserted by Lua scripts that keep one
sorted set per service (by load) and publish an event per change.

- `topology` one Redis, a Sentinel deployment or a Cluster, from one URL.
- `events`   the change events routers subscribe to, and their decoding.
- `registry` `Registry`: upsert, lookup, hold and release during a partition.
- `batch`    concurrent lookups sent to Redis as one call per turn of the event loop.
- `lua/`     the scripts, with the service-name filter they share (`services.lua`).
"""

from __future__ import annotations

from dht_bridge.registry.events import Event, EventSubscription
from dht_bridge.registry.registry import STALE_SCORE, Provider, Registry, open_registry
from dht_bridge.registry.topology import RedisTarget, Topology, parse_redis_url

__all__ = [
    "STALE_SCORE",
    "Event",
    "EventSubscription",
    "Provider",
    "RedisTarget",
    "Registry",
    "Topology",
    "open_registry",
    "parse_redis_url",
]
