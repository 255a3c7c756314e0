"""The edge router: a Starlette app in front of the registry and the DHT.

- `config`     `RouterConfig` (frozen) and `ROUTER_OPTIONS`, the `rma router` options.
- `app`        `create_app(config, registry=..., dht=...)`: routes, lifespan, middleware.
- `handlers`   the HTTP endpoints: bootstrap, lookups, registration, admin, topology, health.
- `providers`  lookups: the cache first, then Redis, then the DHT.
- `cache`      the lookup cache (fresh, then stale on bad days) with single-flight reads.
- `proxy`      `/route/{service}/...`: choosing a provider, streaming, retries, ejection.
- `events`     the `rma:events` listener that keeps replicas' caches in step.
- `bootstrap`  the peers `/dht/bootstrap` hands out.
- `cloudflare` trusted client addresses, CF-Ray, countries, the edge budget.
- `metrics`, `page`, `dht_modes`, `state`: the figures, the topology page, its counts.
- `errors`     `RouterError` and the one place every project error becomes an HTTP status.
"""

from __future__ import annotations

from edge_router.app import create_app
from edge_router.config import ROUTER_OPTIONS, CacheSettings, RouterConfig
from edge_router.errors import RouterError, status_for

__all__ = [
    "ROUTER_OPTIONS",
    "CacheSettings",
    "RouterConfig",
    "RouterError",
    "create_app",
    "status_for",
]
