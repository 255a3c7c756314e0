"""Capability filters on lookups and routes: `?cap=arch=x86_64&cap=gpu_mem>=16`.

`key=value` asks for equality (numbers and true/false compare by value, other text exactly);
`key>=number` for at least that much. Every filter must hold; a provider without the key does
not match. Filters apply to the least-loaded providers a lookup reads (up to the router's
largest `limit`), so a rare capability among many providers may be missed: ask with a region
or a smaller service for those.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dht_bridge.records import CAPABILITY_KEY_RE, CapabilityValue, WorkerRecord
from edge_router.errors import BadRequest

__all__ = ["MAX_FILTERS", "CapabilityFilter", "parse_filters", "select"]

MAX_FILTERS = 8
_FILTER = re.compile(r"(?P<key>[^=<>]+)(?P<op>>=|=)(?P<value>.+)")


@dataclass(frozen=True)
class CapabilityFilter:
    """One condition on a provider's capabilities."""

    key: str
    op: str  # "=" or ">="
    value: CapabilityValue

    def holds(self, record: WorkerRecord) -> bool:
        """Does `record` meet this condition?"""
        have = record.capabilities.get(self.key)
        if have is None:
            return False
        if self.op == ">=":
            if isinstance(have, bool) or not isinstance(have, int | float):
                return False
            return have >= self.value  # type: ignore[operator]
        if isinstance(self.value, bool) or isinstance(have, bool):
            return have is self.value
        return have == self.value


def parse_filters(raw: Sequence[str]) -> tuple[CapabilityFilter, ...]:
    """The `cap` query parameters, checked; BadRequest says which one is wrong and why."""
    if len(raw) > MAX_FILTERS:
        raise BadRequest(f"at most {MAX_FILTERS} cap filters")
    filters = []
    for text in raw:
        found = _FILTER.fullmatch(text.strip())
        if found is None:
            raise BadRequest(f"cap {text!r}: expected key=value or key>=number")
        key, op, value = found["key"], found["op"], found["value"]
        if not CAPABILITY_KEY_RE.fullmatch(key):
            raise BadRequest(f"cap {text!r}: the key must match [a-z0-9_.-]{{1,32}}")
        filters.append(CapabilityFilter(key, op, _value(text, op, value)))
    return tuple(filters)


def select(
    records: Sequence[WorkerRecord], filters: Sequence[CapabilityFilter]
) -> list[WorkerRecord]:
    """The records meeting every filter, in their order."""
    if not filters:
        return list(records)
    return [r for r in records if all(f.holds(r) for f in filters)]


def _value(text: str, op: str, value: str) -> CapabilityValue:
    if op == ">=":
        try:
            number = float(value)
        except ValueError:
            raise BadRequest(f"cap {text!r}: >= needs a number") from None
        if not math.isfinite(number):
            raise BadRequest(f"cap {text!r}: >= needs a finite number")
        return number
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if isinstance(number, float) and not math.isfinite(number):
            break
        return number
    return value
