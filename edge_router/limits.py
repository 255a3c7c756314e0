"""Limits on what a client may send in a JSON body: its size (read_json takes the router's
max_body) and how deeply it nests.

A record is three levels deep at most; a 60,000-deep array made json.loads raise RecursionError,
which the app answered with 500.
"""

from __future__ import annotations

import json
from typing import Any

from edge_router.errors import BadRequest

# Tunable an operator may want as an option; a constant until the router's options are reworked.
MAX_JSON_DEPTH = 32  # nested arrays and objects in a client's JSON body


def parse_json(body: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`body` as JSON (empty means null); BadRequest when it is not JSON or nests too deeply."""
    try:
        value = json.loads(body or b"null")
    except RecursionError:
        # CPython's decoder stops at the interpreter's recursion limit (about 1000 levels).
        raise BadRequest(f"JSON body nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # UnicodeDecodeError and over-long integers included
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if json_depth(value, stop_after=max_depth) > max_depth:
        raise BadRequest(f"JSON body nests deeper than {max_depth} levels")
    return value


def json_depth(value: Any, *, stop_after: int) -> int:
    """How deeply arrays and objects nest in `value` (a scalar is 0), counted without recursion;
    the count stops once it passes `stop_after`."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if not isinstance(item, dict | list):
            continue
        children = item.values() if isinstance(item, dict) else item
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > stop_after:
                break
        pending.extend((child, depth) for child in children)
    return deepest


__all__ = ["MAX_JSON_DEPTH", "json_depth", "parse_json"]
