"""Fields that every log line of the current task carries (a request's CF-Ray, the worker id),
for the JSON log format: set where they become known, read by the formatter."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from types import MappingProxyType

__all__ = ["add_log_fields", "log_fields", "log_fields_bound"]

# A context variable, not a global: each task (a request, an agent's loop) sees its own copy.
_FIELDS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "rma_log_fields", default=MappingProxyType({})
)


def log_fields() -> Mapping[str, str]:
    """The fields bound in this context."""
    return _FIELDS.get()


def add_log_fields(**fields: str) -> None:
    """Bind `fields` for the rest of this task and the tasks it starts from now on."""
    _FIELDS.set({**_FIELDS.get(), **fields})


@contextlib.contextmanager
def log_fields_bound(**fields: str) -> Iterator[None]:
    """Bind `fields` for the duration of the block (one request, say)."""
    token = _FIELDS.set({**_FIELDS.get(), **fields})
    try:
        yield
    finally:
        _FIELDS.reset(token)
