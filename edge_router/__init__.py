"""The edge router: a Starlette app in front of the registry and the DHT.

- `config`       `RouterConfig` (frozen) and `ROUTER_OPTIONS`, the `rma router` options.
- `app`          `create_app(config, registry=..., dht=...)`: routes, lifespan, middleware.
- `server`, `framing`  the HTTP/1.1 server protocol: strict framing, read deadlines, slow
                 connections bounded per client address.
- `limits`, `ratelimit`, `windows`  JSON depth and size limits; rate limits per client
                 address, kept in Redis or (`windows`) in the replica's own memory.
- `handlers`     bootstrap, lookups, registration, admin, routing, topology.
- `catalog`      `GET /services`; `capabilities` the `?cap=` filters.
- `providers`    lookups: the cache first, then Redis, then the DHT.
- `fastpath`     a lookup's kept cache hit answered in front of the middleware and routes.
- `cache`        the lookup cache (fresh, then stale on bad days) with single-flight reads.
- `upstream/`    `/route/{service}/...`: choosing a provider, streaming, retries, ejection,
                 tunnel proofs, and the kept-alive connections to tunnels.
- `events`       the `rma:events` listener that keeps replicas' caches in step.
- `bootstrap`    the peers `/dht/bootstrap` hands out.
- `cloudflare`   trusted client addresses, CF-Ray, countries.
- `health`, `metrics`  `/livez`, `/readyz`, `/healthz`, `/metrics` (prometheus_client);
                 `accounting` counts every answered request into them.
- `openapi`      `/openapi.json`, kept complete by a test.
- `page`, `dht_modes`, `state`: the topology page (`static/`), its counts, the shared state.
- `errors`       `RouterError` and the one place every project error becomes an HTTP status.
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
