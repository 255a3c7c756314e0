"""Limits on what a client may send in a JSON body: its size (read_json takes the router's
max_body) and how deeply it nests (a record is three levels deep at most)."""

from __future__ import annotations

from typing import Any

from dht_bridge.errors import JSONTooDeep
from dht_bridge.jsontext import loads_bounded
from edge_router.errors import BadRequest

# Tunable an operator may want as an option; a constant until the router's options are reworked.
MAX_JSON_DEPTH = 32  # nested arrays and objects in a client's JSON body


def parse_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`body` as JSON (empty means null); BadRequest when it is not JSON or nests too deeply."""
    try:
        return loads_bounded(body or b"null", max_depth=max_depth)
    except JSONTooDeep:
        raise BadRequest(f"JSON body nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


__all__ = ["MAX_JSON_DEPTH", "parse_json"]
