"""`GET /services`: every service with its provider count, cached like lookups."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dht_bridge.errors import RegistryError
from edge_router.cache import CacheState
from edge_router.errors import BackendUnavailable
from edge_router.handlers import state_of

__all__ = ["services"]

Entry = dict[str, Any]


async def services(request: Request) -> Response:
    """GET /services: `{"services": [{"service", "providers"}], "source"}`, most offered first.

    Counts come from the registry's service sets: a provider whose lease ended in the last
    seconds may still be counted until the next lookup of its service prunes it.
    """
    state = state_of(request)

    async def fetch() -> list[Entry]:
        try:
            names = await state.registry.services()
            counts = await state.registry.counts(names)
        except RegistryError as exc:
            raise BackendUnavailable(f"registry unavailable: {exc}") from exc
        listed = [{"service": n, "providers": c} for n, c in zip(names, counts, strict=True) if c]
        return sorted(listed, key=lambda e: (-e["providers"], e["service"]))

    entries, cache_state, age = await state.catalog.get(("services",), fetch)
    body = {
        "services": entries,
        "source": "cache" if cache_state is not CacheState.MISS else "redis",
    }
    headers = {"X-Cache": cache_state.value, "Age": str(int(age))}
    return JSONResponse(body, headers=headers)
