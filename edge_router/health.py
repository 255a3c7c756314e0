"""How the router is doing, for probes and scrapers: `/livez`, `/readyz`, `/healthz`,
`/metrics`.

- live: the process answers (nothing else is checked: a restart would not mend a backend);
- ready: start-up is done, it is not draining, and Redis or the DHT can answer a lookup;
- healthz: both sides, and the version, for people.
"""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dht_bridge.errors import RegistryError
from dht_bridge.version import __version__
from edge_router.dht_modes import mode_counts
from edge_router.handlers import figures, registry_records, state_of
from edge_router.metrics import FIGURES
from edge_router.state import RouterState

__all__ = ["healthz", "livez", "metrics", "readyz"]

logger = logging.getLogger(__name__)


async def livez(request: Request) -> Response:
    """GET /livez: the process is up."""
    return JSONResponse({"status": "live"})


async def readyz(request: Request) -> Response:
    """GET /readyz: 200 when this router should get traffic, 503 (with why) otherwise."""
    state = state_of(request)
    redis_ok, dht_ok = await _backends(state)
    if state.draining:
        why = "draining"
    elif not state.started:
        why = "starting"
    elif not (redis_ok or dht_ok):
        why = "neither Redis nor the DHT answers"
    else:
        return JSONResponse({"status": "ready", "redis": redis_ok, "dht": dht_ok})
    return JSONResponse(
        {"status": "not ready", "why": why, "redis": redis_ok, "dht": dht_ok}, status_code=503
    )


async def healthz(request: Request) -> Response:
    """GET /healthz: 200 while Redis or the DHT can answer, 503 when neither can."""
    state = state_of(request)
    redis_ok, dht_ok = await _backends(state)
    status = "ok" if redis_ok and (dht_ok or state.dht is None) else "degraded"
    if not redis_ok and not dht_ok:
        status = "down"
    return JSONResponse(
        {
            "status": status,
            "redis": redis_ok,
            "dht": dht_ok if state.dht else None,
            "draining": state.draining,
            "version": __version__,
        },
        status_code=503 if status == "down" else 200,
    )


async def metrics(request: Request) -> Response:
    """GET /metrics: the Prometheus exposition."""
    state = state_of(request)
    counted = dict(figures(state))
    try:
        records, truncated = await registry_records(state)
        counted.update(mode_counts(records, state.clock()))
        counted["topology_truncated"] = int(truncated)
    except RegistryError as exc:
        # The counts are left out rather than shown as zero: no registry is not no workers.
        logger.warning("metrics: registry unavailable, no DHT mode counts: %s", exc)
    limiter = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        counted["rate_limited"] = sum(limiter.stats.limited.values())
        counted["rate_limit_storage_failures"] = limiter.stats.storage_failures
    exposed = {_metric_name(name): float(value) for name, value in counted.items()}
    return Response(state.metrics.expose(exposed), media_type=CONTENT_TYPE_LATEST)


def _metric_name(name: str) -> str:
    """`cache_hits` -> `rma_cache_hits_total` where the figure is a counter."""
    full = f"rma_{name}"
    return f"{full}_total" if f"{full}_total" in FIGURES else full


async def _backends(state: RouterState) -> tuple[bool, bool]:
    try:
        await state.registry.ping()
        redis_ok = True
    except RegistryError:
        redis_ok = False
    # A node whose socket closed (and is being reopened) answers nobody, whatever it knows.
    dht_ok = (
        state.dht is not None
        and state.dht.listening
        and (len(state.dht.rpc.router) > 0 or not state.config.dht_bootstrap)
    )
    return redis_ok, dht_ok
