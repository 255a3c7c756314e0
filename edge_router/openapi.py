"""`GET /openapi.json`: the router's HTTP API described (OpenAPI 3.1), written out by hand.

A test walks the app's routes and fails when one is missing here (or described but gone), so
the description cannot drift from the code. The worker record's shape is the JSON Schema in
docs/worker-record.schema.json, referenced here rather than repeated.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dht_bridge.version import __version__

__all__ = ["DOCUMENTED", "openapi", "spec"]

Json = dict[str, Any]

_ERROR: Json = {
    "description": "an error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_SERVICE = {
    "name": "service",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9-]{1,32}$"},
}
_REGION = {
    "name": "region",
    "in": "query",
    "description": "prefer providers in this region (a preference, not a filter); default: "
    "the client's CF-IPCountry when trusted",
    "schema": {"type": "string", "pattern": "^[a-z0-9-]{0,32}$"},
}
_CAP = {
    "name": "cap",
    "in": "query",
    "description": "capability filter, repeatable: key=value (equality) or key>=number",
    "schema": {"type": "array", "items": {"type": "string"}},
    "style": "form",
    "explode": True,
}
_RECORD = {"$ref": "#/components/schemas/WorkerRecord"}
# Registration, routing, admin and the topology reads are rate limited per client address.
_RATE_LIMITED: Json = {**_ERROR, "description": "rate limited; Retry-After says when to retry"}


def _answer(description: str, schema: Json | None = None) -> Json:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _route(summary: str) -> Json:
    answers = {
        "2XX": _answer("the worker's answer, streamed"),
        "429": _RATE_LIMITED,
        "default": _ERROR,
    }
    return {
        "summary": summary,
        "parameters": [_SERVICE, _REGION, _CAP],
        "requestBody": {"required": False, "content": {"*/*": {}}},
        "responses": answers,
    }


def spec() -> Json:
    """The OpenAPI document."""
    route_methods = ("get", "head", "post", "put", "patch", "delete", "options")
    routed = _route("proxy to a provider of the service, through its tunnel")
    paths: Json = {
        "/dht/bootstrap": {
            "get": {
                "summary": "DHT peers for a joining worker (coordinators first)",
                "parameters": [_REGION],
                "responses": {
                    "200": _answer("peers and how long to keep them", {"type": "object"}),
                    "503": _ERROR,
                },
            }
        },
        "/services": {
            "get": {
                "summary": "every service with its provider count",
                "responses": {"200": _answer("the catalog", {"type": "object"}), "503": _ERROR},
            }
        },
        "/services/{service}": {
            "get": {
                "summary": "providers of a service, least loaded first; an unknown service "
                "answers 200 with none",
                "parameters": [
                    _SERVICE,
                    _REGION,
                    _CAP,
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                ],
                "responses": {
                    "200": _answer(
                        "providers (X-Cache: HIT, MISS or STALE)",
                        {
                            "type": "object",
                            "properties": {
                                "service": {"type": "string"},
                                "providers": {"type": "array", "items": _RECORD},
                                "source": {"enum": ["cache", "redis", "dht"]},
                            },
                        },
                    ),
                    "400": _ERROR,
                    "503": _ERROR,
                },
            }
        },
        "/workers": {
            "post": {
                "summary": "register or heartbeat a signed record (when the DHT is out of reach)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _RECORD}},
                },
                "responses": {
                    "200": _answer("stored", {"type": "object"}),
                    "400": _ERROR,
                    "413": _ERROR,
                    "422": _ERROR,
                    "429": _RATE_LIMITED,
                    "503": _ERROR,
                },
            }
        },
        "/workers/{worker_id}": {
            "delete": {
                "summary": "leave, with a signed tombstone as the body",
                "parameters": [
                    {
                        "name": "worker_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{40}$"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _RECORD}},
                },
                "responses": {"200": _answer("gone"), "400": _ERROR, "422": _ERROR},
            }
        },
        "/route/{service}/{path}": dict.fromkeys(route_methods, routed),
        "/route/{service}": dict.fromkeys(route_methods, routed),
        "/admin/cache/flush": {
            "post": {
                "summary": "flush the lookup caches of every router (bearer RMA_ADMIN_TOKEN)",
                "security": [{"bearer": []}],
                "requestBody": {
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"service": {"type": "string"}},
                            }
                        }
                    }
                },
                "responses": {
                    "200": _answer("what was flushed", {"type": "object"}),
                    "401": _ERROR,
                    "403": _ERROR,
                    "429": _RATE_LIMITED,
                },
            }
        },
        "/topology": {
            "get": {
                "summary": "the network as JSON, for the topology page",
                "responses": {
                    "200": _answer("workers, services, figures", {"type": "object"}),
                    "429": _RATE_LIMITED,
                },
            }
        },
        "/livez": {"get": {"summary": "the process answers", "responses": {"200": _answer("")}}},
        "/readyz": {
            "get": {
                "summary": "ready for traffic: started, not draining, a backend answers",
                "responses": {"200": _answer("ready"), "503": _answer("not ready, and why")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Redis and the DHT, and the version",
                "responses": {"200": _answer("up or degraded"), "503": _answer("down")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus exposition",
                "responses": {"200": {"description": "text", "content": {"text/plain": {}}}},
            }
        },
        "/openapi.json": {
            "get": {"summary": "this document", "responses": {"200": _answer("OpenAPI 3.1")}}
        },
        "/": {
            "get": {
                "summary": "the topology page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
            }
        },
        "/static/{file}": {
            "get": {
                "summary": "the page's script and style",
                "parameters": [
                    {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _answer("a file"), "404": _answer("no such file")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "RMA discovery edge router", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
                "WorkerRecord": {
                    "description": "a signed worker record: docs/worker-record.schema.json",
                    "type": "object",
                },
            },
        },
    }


# The paths above, as the test compares them with the app's routes.
DOCUMENTED = frozenset(spec()["paths"])


async def openapi(request: Request) -> Response:
    """GET /openapi.json."""
    return JSONResponse(spec())
