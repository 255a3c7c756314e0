"""`/openapi.json` describes every route the app has, and nothing it has not."""

from __future__ import annotations

import re
from collections.abc import Iterator

from starlette.routing import Mount, Route

from dht_bridge.registry.registry import Registry
from dht_bridge.version import __version__
from edge_router.openapi import spec
from tests.support.router import client_for, router_app


def app_routes(registry: Registry) -> dict[str, set[str]]:
    """Each path template of the app (as OpenAPI writes it) and its methods."""
    found: dict[str, set[str]] = {}
    for route in router_app(registry).routes:
        if isinstance(route, Route):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            found[path] = {m.lower() for m in route.methods or ()} - {"head"}
        elif isinstance(route, Mount):
            found[route.path + "/{file}"] = {"get"}
    return found


async def test_every_route_is_described_with_its_methods(registry: Registry) -> None:
    described = spec()["paths"]
    routes = app_routes(registry)
    assert set(routes) == set(described), (
        f"missing from the spec: {set(routes) - set(described)}; "
        f"described but gone: {set(described) - set(routes)}"
    )
    for path, methods in routes.items():
        assert methods <= set(described[path]), (path, methods - set(described[path]))


async def test_the_document_is_served_and_references_resolve(registry: Registry) -> None:
    async with client_for(router_app(registry)) as client:
        answer = await client.get("/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    assert document["openapi"].startswith("3.1")
    assert document["info"]["version"] == __version__
    schemas = document["components"]["schemas"]
    refs = list(_refs(document))
    assert refs
    for ref in refs:
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield str(value)
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)
