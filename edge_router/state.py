"""What every handler of the router shares, built once by the app factory."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from dht_bridge.dht.node import DHTNode
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry
from edge_router.bootstrap import PeerPool
from edge_router.cache import BoundedMemo, LookupCache
from edge_router.cloudflare import ClientResolver
from edge_router.config import RouterConfig
from edge_router.metrics import Metrics
from edge_router.providers import ProviderSource
from edge_router.server import RefusalLog
from edge_router.upstream.proxy import Proxy

# Records whose JSON is kept (a record is a few hundred bytes: a few MB at most).
RECORD_JSON_KEPT = 16_384


@dataclass
class RouterState:
    """The router's parts: configuration, backends, caches, proxy, counters, clocks."""

    config: RouterConfig
    registry: Registry
    dht: DHTNode | None
    http: httpx.AsyncClient
    providers: ProviderSource
    lookups: LookupCache[list[WorkerRecord]]
    peers: LookupCache[PeerPool]
    catalog: LookupCache[list[dict[str, Any]]]
    # What /topology and /metrics read of the registry, kept briefly: a flood of them costs one
    # registry scan per TOPOLOGY_CACHE_SECONDS.
    introspection: LookupCache[tuple[list[WorkerRecord], bool]]
    proxy: Proxy
    metrics: Metrics
    resolver: ClientResolver
    clock: Callable[[], float] = time.time
    # More figures for /topology and /metrics, e.g. an in-process bridge's (the demo's).
    extra_figures: Callable[[], Mapping[str, float]] | None = None
    events_connected: bool = False
    events_received: int = 0
    # Requests the server protocol refused before the app (see `server_config`).
    refused: RefusalLog = field(default_factory=RefusalLog)
    # Readiness: set once the lifespan has started; draining from SIGTERM until the exit.
    started: bool = False
    draining: bool = False
    notes: dict[str, float] = field(default_factory=dict)
    # Each record's JSON as lookup answers carry it (handlers.lookup_body), by its signature: a
    # record is sent in many answers (every limit, filter and region) for as long as it is
    # current. The signature covers every other field, and a str keeps its hash, where hashing
    # the record itself cost a microsecond each time.
    record_json: BoundedMemo[str, bytes] = field(
        default_factory=lambda: BoundedMemo(RECORD_JSON_KEPT)
    )
