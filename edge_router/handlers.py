"""The router's endpoints. Each reads what it needs from `RouterState` and raises on failure;
the app's one exception handler turns errors into JSON."""

from __future__ import annotations

import functools
import hmac
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dht_bridge.errors import RecordInvalid, RegistryError, RegistryUnavailable
from dht_bridge.records import SERVICE_RE, WorkerRecord, parse_and_validate
from edge_router.bootstrap import Peer, PeerPool, choose_peers, scan_pool
from edge_router.cache import CacheState, Entry
from edge_router.capabilities import parse_filters, select
from edge_router.config import CacheSettings
from edge_router.dht_modes import mode_counts, mode_of
from edge_router.errors import (
    BackendUnavailable,
    BadRequest,
    Forbidden,
    NoProvider,
    PayloadTooLarge,
    Unauthorized,
)
from edge_router.limits import parse_json
from edge_router.metrics import ROUTED_SERVICE
from edge_router.state import RouterState
from edge_router.upstream.proof import prover_of

logger = logging.getLogger(__name__)


# Serialized lookup answers kept per cached answer (one per limit, filters and source asked).
KEPT_BODIES = 16


def state_of(request: Request) -> RouterState:
    """The shared state the app factory put on the app."""
    state: RouterState = request.app.state.rma
    return state


# Lookups.


@dataclass(frozen=True, slots=True)
class LookupAsk:
    """What a lookup request asks: the service, how many, which region, which capabilities."""

    service: str
    limit: int
    region: str | None
    caps: tuple[str, ...]

    @property
    def cache_key(self) -> tuple[str, ...]:
        """The cached answer it reads (one per service and region)."""
        return ("svc", self.service, self.region or "")

    def body_key(self, label: str) -> tuple[Any, ...]:
        """Where its serialized body is kept in the cached answer's `derived` memo."""
        return ("body", self.limit, self.caps, label)


def lookup_ask(state: RouterState, request: Request, service: str) -> LookupAsk:
    """Read and check a lookup's parameters; raises BadRequest."""
    params = _query(request)
    return LookupAsk(
        service=_service(service),
        limit=_limit(params, state),
        region=_region(params, request, state),
        caps=_caps(params),
    )


async def lookup(request: Request) -> Response:
    """GET /services/{service}: providers, least loaded first, through the cache."""
    state = state_of(request)
    ask = lookup_ask(state, request, request.path_params["service"])
    body, cache_state, age = await lookup_answer(state, ask)
    response = Response(body)
    response.raw_headers = lookup_headers(state, cache_state, age, body)
    return response


async def lookup_answer(state: RouterState, ask: LookupAsk) -> tuple[bytes, CacheState, float]:
    """The body of the answer to `ask`, how the cache served it, and its age; raises the
    router's errors (BadRequest for a bad filter, BackendUnavailable, ...)."""
    filters = parse_filters(list(ask.caps))
    entry, cache_state, age, source = await _cached_entry(state, ask.service, ask.region)
    label = "cache" if cache_state is not CacheState.MISS else source
    # The JSON is built once per cached answer and shape of request, and kept with the answer
    # (a hit only sends bytes) until the answer is dropped or a listed lease ends.
    now = state.clock()
    key = ask.body_key(label)
    kept: tuple[bytes, float] | None = entry.derived.get(key)
    if kept is None or now >= kept[1]:
        live = _servable(state, entry.value, now)
        chosen = select(live, filters)[: ask.limit]
        until = min((r.expires_at for r in live if r.expires_at > now), default=math.inf)
        kept = (lookup_body(state, ask.service, chosen, label), until)
        # Bounded: `cap` filters vary without limit, and a client must not grow the cache.
        if key in entry.derived or len(entry.derived) < KEPT_BODIES:
            entry.derived[key] = kept
    return kept[0], cache_state, age


def lookup_body(
    state: RouterState, service: str, records: Sequence[WorkerRecord], source: str
) -> bytes:
    """The JSON of a lookup answer, byte for byte what JSONResponse renders of
    `{"service", "providers": [to_dict of each], "source"}`, from each record's JSON kept
    since it was first sent (a miss spent a tenth of its CPU re-encoding the same records)."""
    kept = state.record_json
    parts = []
    for record in records:
        part = kept.get(record.signature)
        if part is None:
            part = kept[record.signature] = _json(record.to_dict())
        parts.append(part)
    return b'{"service":%s,"providers":[%s],"source":%s}' % (
        _json(service),
        b",".join(parts),
        _json(source),
    )


def _json(value: Any) -> bytes:
    # JSONResponse's rendering.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def kept_hit(state: RouterState, ask: LookupAsk) -> tuple[bytes, float] | None:
    """The kept body of a fresh cached answer to `ask`, and the answer's age; None unless the
    cache holds a fresh answer whose body for this request was built and is still valid.

    Counts nothing: the caller that sends it counts the hit (`LookupCache.count_hit`).
    """
    found = state.lookups.peek(ask.cache_key)
    if found is None:
        return None
    entry, age = found
    kept = entry.derived.get(ask.body_key("cache"))
    if kept is None or state.clock() >= kept[1]:
        return None
    return kept[0], age


def lookup_headers(
    state: RouterState, cache_state: CacheState, age: float, body: bytes
) -> list[tuple[bytes, bytes]]:
    """Every header of a lookup answer (the server adds Date), for every path that sends one."""
    headers = [
        (b"x-cache", cache_state.value.encode("latin-1")),
        *_cache_control(state.config.cache),
        (b"age", b"%d" % int(age)),
    ]
    if cache_state is CacheState.STALE:
        headers.append((b"warning", b'110 - "Response is Stale"'))
        headers.append((b"x-rma-warning", b"backends unavailable; answer is stale"))
    headers.append((b"content-length", b"%d" % len(body)))
    headers.append((b"content-type", b"application/json"))
    return headers


@functools.lru_cache(maxsize=8)
def _cache_control(cache: CacheSettings) -> tuple[tuple[bytes, bytes], ...]:
    # As the IPFS delegated routing API does: the CDN may serve a stale copy while it
    # revalidates, and for a long while when the origin fails.
    control = (
        f"public, max-age={int(cache.ttl)}, "
        f"stale-while-revalidate={int(cache.stale_while_revalidate)}, "
        f"stale-if-error={int(cache.stale)}"
    ).encode("latin-1")
    return ((b"cache-control", control), (b"cdn-cache-control", control))


async def cached_providers(
    state: RouterState, service: str, region: str | None
) -> tuple[list[WorkerRecord], CacheState, float, str]:
    """Providers of `service` from the cache, or one backend read shared by concurrent misses."""
    entry, cache_state, age, source = await _cached_entry(state, service, region)
    return _servable(state, entry.value, state.clock()), cache_state, age, source


def _servable(state: RouterState, records: list[WorkerRecord], now: float) -> list[WorkerRecord]:
    return [r for r in records if state.providers.servable(r, now)]


async def _cached_entry(
    state: RouterState, service: str, region: str | None
) -> tuple[Entry[list[WorkerRecord]], CacheState, float, str]:
    source = "cache"

    async def fetch() -> list[WorkerRecord]:
        nonlocal source
        found, source = await state.providers.find(
            service, region=region, limit=state.config.max_limit
        )
        return found

    entry, cache_state, age = await state.lookups.entry(("svc", service, region or ""), fetch)
    return entry, cache_state, age, source


def _service(name: str) -> str:
    if not SERVICE_RE.fullmatch(name):
        raise BadRequest(f"service name {name!r} does not match [a-z0-9-]{{1,32}}")
    return name


def _query(request: Request) -> QueryParams | None:
    """The request's query parameters, or None when it has no query string: most lookups and
    routes ask none, and parsing an empty one cost a tenth of a cache hit's CPU."""
    return request.query_params if request.scope.get("query_string") else None


def _limit(params: QueryParams | None, state: RouterState) -> int:
    # `in` first: Mapping.get raises and catches a KeyError for every absent parameter.
    if params is None or "limit" not in params:
        return state.config.default_limit
    raw = params["limit"]
    if not raw.isdigit() or not 1 <= int(raw) <= state.config.max_limit:
        raise BadRequest(f"limit must be an integer from 1 to {state.config.max_limit}")
    return int(raw)


def _region(params: QueryParams | None, request: Request, state: RouterState) -> str | None:
    if params is None or "region" not in params:
        return state.resolver.country(request)
    raw = params["region"].strip().lower()
    if len(raw) > 32 or not all(c.isalnum() or c == "-" for c in raw):
        raise BadRequest("region must match [a-z0-9-]{0,32}")
    return raw or None


def _caps(params: QueryParams | None) -> tuple[str, ...]:
    return tuple(params.getlist("cap")) if params is not None else ()


# Bootstrap.


async def bootstrap(request: Request) -> Response:
    """GET /dht/bootstrap: a few live DHT peers for a joining worker."""
    state = state_of(request)
    peers, cache_state, age = await bootstrap_peers(state, _region(_query(request), request, state))
    if not peers:
        raise NoProvider("no DHT peer is known yet; retry later")
    ttl = state.config.bootstrap_ttl
    return JSONResponse(
        {"peers": peers, "ttl": ttl},
        headers={
            "Cache-Control": f"public, max-age={min(ttl, 60)}",
            "CDN-Cache-Control": f"public, max-age={ttl}, stale-if-error={ttl * 4}",
            "X-Cache": cache_state.value,
            "Age": str(int(age)),
        },
    )


async def bootstrap_peers(
    state: RouterState, region: str | None
) -> tuple[list[Peer], CacheState, float]:
    """The peers `/dht/bootstrap` hands out for `region`, from the router's cached pool."""

    async def fetch() -> PeerPool:
        return await scan_pool(
            coordinators=state.config.coordinators,
            registry=state.registry,
            dht=state.dht,
            now=state.clock(),
        )

    pool, cache_state, age = await state.peers.get(("pool",), fetch)
    return choose_peers(pool, region=region, count=state.config.bootstrap_peers), cache_state, age


# Registration fallback.


async def register(request: Request) -> Response:
    """POST /workers: register or heartbeat a signed record (for workers off the DHT)."""
    state = state_of(request)
    record = await _signed_record(request, state, "the worker's signed record")
    return await _store(state, record)


async def leave(request: Request) -> Response:
    """DELETE /workers/{worker_id}: graceful leave with a signed tombstone."""
    state = state_of(request)
    record = await _signed_record(request, state, "the worker's signed tombstone")
    if record.worker_id != request.path_params["worker_id"]:
        raise BadRequest("the tombstone's worker_id does not match the URL")
    if not record.tombstone:
        raise RecordInvalid("tombstone", "DELETE takes a signed record with tombstone true")
    response = await _store(state, record)
    for service in record.services:
        state.lookups.flush(("svc", service))
    return response


async def _signed_record(request: Request, state: RouterState, what: str) -> WorkerRecord:
    body = await read_json(request, state)
    if body is None:  # no body at all: say what belongs there, not what is wrong with nothing
        raise BadRequest(f"{request.method} {request.url.path} takes {what} as its JSON body")
    return parse_and_validate(body, state.config.policy, now=state.clock())


async def _store(state: RouterState, record: WorkerRecord) -> Response:
    body: dict[str, Any] = {"worker_id": record.worker_id, "seq": record.seq}
    try:
        applied = await state.registry.upsert(record)
    except RegistryUnavailable as exc:
        if state.dht is None:
            raise
        # Nothing is lost: the DHT holds it, and the bridge copies it into Redis later.
        logger.warning("registry unavailable, registering %s in the DHT: %s", record.worker_id, exc)
        await state.dht.publish(record)
        return JSONResponse({**body, "applied": True, "stored_in": "dht"}, status_code=202)
    if not applied:
        return JSONResponse(
            {
                **body,
                "error": "stale_record",
                "detail": "an equal or newer record of this worker is registered",
            },
            status_code=409,
        )
    return JSONResponse({**body, "applied": True, "stored_in": "redis"})


async def read_json(request: Request, state: RouterState) -> Any:
    """The request body as JSON: 413 over the configured size, 400 when not JSON or nested
    deeper than MAX_JSON_DEPTH."""
    limit = state.config.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


# Operator.


def check_admin(request: Request, state: RouterState) -> None:
    """Bearer token against RMA_ADMIN_TOKEN, compared in constant time."""
    token = state.config.admin_token
    if not token:
        raise Forbidden("admin endpoints are disabled: RMA_ADMIN_TOKEN is not set")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("a bearer token is required")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Forbidden("wrong admin token")


async def flush(request: Request) -> Response:
    """POST /admin/cache/flush: `{}` flushes all, `{"service": s}` one; reaches every replica."""
    state = state_of(request)
    check_admin(request, state)
    body = await read_json(request, state)
    if body is None:
        body = {}
    if not isinstance(body, dict) or set(body) - {"service"}:
        raise BadRequest('body must be {} or {"service": name}')
    service = body.get("service")
    if service is not None and not isinstance(service, str):
        raise BadRequest("service must be a string")
    if service is not None:
        service = _service(service)
    flushed = flush_local(state, service)
    try:
        await state.registry.publish_event({"type": "flush", "service": service})
        propagated = True
    except RegistryError as exc:
        logger.warning("flush not propagated to other routers: %s", exc)
        propagated = False
    return JSONResponse({"flushed": flushed, "service": service, "propagated": propagated})


def flush_local(state: RouterState, service: str | None) -> int:
    """Drop this router's cached lookups (one service, or all and the bootstrap peers)."""
    if service is None:
        return state.lookups.flush() + state.peers.flush() + state.catalog.flush()
    return state.lookups.flush(("svc", service))


# Routing.


async def route(request: Request) -> Response:
    """* /route/{service}/{path}: proxy to a provider's tunnel URL."""
    state = state_of(request)
    service = _service(request.path_params["service"])
    params = _query(request)
    region = _region(params, request, state)
    filters = parse_filters(list(_caps(params)))
    providers, _, _, _ = await cached_providers(state, service, region)
    if providers:
        setattr(request.state, ROUTED_SERVICE, service)  # its own latency series (metrics)
    providers = select(providers, filters)
    if not providers:
        which = " with those capabilities" if filters else ""
        raise NoProvider(f"no provider of {service!r}{which} is registered")
    providers = prover_of(request).routable(service, providers)
    return await state.proxy.forward(
        request,
        service,
        f"/route/{service}",
        providers,
        client_ip=state.resolver.client_ip(request),
        cf_ray=state.resolver.cf_ray(request),
    )


# Introspection.


async def topology(request: Request) -> Response:
    """GET /topology: workers, services, regions, load, bootstrap peers, as JSON."""
    state = state_of(request)
    now = state.clock()
    try:
        records, truncated = await registry_records(state)
    except RegistryError as exc:
        raise BackendUnavailable(f"registry unavailable: {exc}") from exc
    workers = [_worker_view(r, now) for r in records if not r.is_expired(now)]
    peers, _, _ = await bootstrap_peers(state, None)
    services: dict[str, int] = {}
    regions: dict[str, int] = {}
    for worker in workers:
        if worker["state"] == "live":
            for service in worker["services"]:
                services[service] = services.get(service, 0) + 1
            regions[worker["region"] or "unknown"] = (
                regions.get(worker["region"] or "unknown", 0) + 1
            )
    return JSONResponse(
        {
            "workers": workers,
            "services": services,
            "regions": regions,
            "coordinators": [{"host": h, "port": p} for h, p in state.config.coordinators],
            # What /dht/bootstrap hands out, here so that the page polls one operator URL and
            # none that the edge budget counts.
            "bootstrap_peers": peers,
            "figures": {
                **await bridge_figures(state),
                **figures(state),
                **mode_counts(records, now),
            },
            # The registry holds more than was read: every count above is a lower bound.
            "truncated": truncated,
        }
    )


async def bridge_figures(state: RouterState) -> dict[str, float]:
    """What the bridges left in Redis (see `Registry.report_bridge`): the largest lag, the
    journals' total, and how many report. Empty when none does or Redis is down."""
    try:
        reports = await state.registry.bridge_reports()
    except RegistryError:
        return {}
    if not reports:
        return {}
    lags = [float(r["figures"].get("rma_bridge_sync_lag_seconds", 0.0)) for r in reports]
    journals = [float(r["figures"].get("rma_bridge_journal_records", 0.0)) for r in reports]
    return {
        "bridge_sync_lag_seconds": max(lags),
        "bridge_journal_records": sum(journals),
        "bridges": float(len(reports)),
    }


async def registry_records(state: RouterState) -> tuple[list[WorkerRecord], bool]:
    """What the introspection pages read of the registry (up to RMA_TOPOLOGY_LIMIT records),
    and whether it holds more; one read serves every caller for TOPOLOGY_CACHE_SECONDS.
    Raises RegistryError."""
    limit = state.config.topology_limit

    async def read() -> tuple[list[WorkerRecord], bool]:
        records = await state.registry.records(limit=limit)
        return records, len(records) >= limit

    answer, _, _ = await state.introspection.get(("registry-records",), read)
    return answer


def _worker_view(record: WorkerRecord, now: float) -> dict[str, Any]:
    return {
        "worker_id": record.worker_id,
        "services": list(record.services),
        "region": record.region,
        "load": record.load,
        "seq": record.seq,
        "state": "left" if record.tombstone else "live",
        "mode": mode_of(record),
        "dht": f"{record.dht_host}:{record.dht_port}" if record.dht_host else None,
        "expires_in": round(record.expires_at - now, 1),
    }


def figures(state: RouterState) -> dict[str, float]:
    """The numbers an operator watches, for /topology and /metrics."""
    stats = state.lookups.stats
    served = stats.hits + stats.misses + stats.stale
    extra = state.extra_figures() if state.extra_figures is not None else {}
    return {
        **{name.removeprefix("rma_"): float(value) for name, value in extra.items()},
        "cache_entries": len(state.lookups),
        "cache_hits": stats.hits,
        "cache_misses": stats.misses,
        "cache_stale": stats.stale,
        "cache_hit_ratio": round(stats.hits / served, 4) if served else 0.0,
        "backend_reads": stats.backend_reads,
        "registry_failures": state.providers.registry_failures,
        "dht_reads": state.providers.dht_reads,
        "dht_reads_refused": state.providers.dht_reads_refused,
        "edge_requests_today": state.metrics.edge_requests_today,
        "edge_daily_budget": state.metrics.daily_budget,
        "events_received": state.events_received,
        "events_connected": int(state.events_connected),
        "requests_refused": state.refused.total,
    }
