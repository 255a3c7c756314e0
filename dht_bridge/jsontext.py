"""JSON that comes from elsewhere (a client's body, the edge's answer, a service's figure), read
with its nesting bounded.

CPython's decoder recurses once per level and raises RecursionError near the interpreter's limit
(about 1000 levels): a few KB of `[` took down whatever read them (the router answered 500, a
worker's agent died). Here every failure is a ValueError, and nesting past `max_depth` is one too.
"""

from __future__ import annotations

import json
from typing import Any

from dht_bridge.errors import JSONTooDeep

__all__ = ["json_depth", "loads_bounded"]


def loads_bounded(data: bytes | str, *, max_depth: int) -> Any:
    """`data` as JSON; JSONTooDeep when it nests deeper than `max_depth`, ValueError when it is
    not JSON (UnicodeDecodeError and over-long integers are ValueErrors already)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONTooDeep(f"JSON nests deeper than {max_depth} levels") from None
    if json_depth(value, stop_after=max_depth) > max_depth:
        raise JSONTooDeep(f"JSON nests deeper than {max_depth} levels")
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
