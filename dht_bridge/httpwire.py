"""HTTP pieces the router and the worker both need: which headers belong to one connection
only, and a body read that stops at a cap (a tunnel or an edge can answer without end)."""

from __future__ import annotations

from collections.abc import Iterable

import httpx

__all__ = ["HOP_BY_HOP", "connection_tokens", "end_to_end", "read_capped"]

# RFC 9110 section 7.6.1, plus the older names proxies still meet.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)


def connection_tokens(raw: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a Connection header lists: they are hop-by-hop too."""
    return frozenset(
        token.strip().lower()
        for k, v in raw
        if k.lower() == b"connection"
        for token in v.split(b",")
        if token.strip()
    )


def end_to_end(
    raw: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """The headers, names lowercased, without hop-by-hop ones and those in `drop`."""
    lowered = [(k.lower(), v) for k, v in raw]
    dropped = HOP_BY_HOP | drop | connection_tokens(lowered)
    return [(k, v) for k, v in lowered if k not in dropped]


async def read_capped(response: httpx.Response, limit: int) -> bytes | None:
    """A streamed response's body (decoded: a gzip bomb counts at its size), or None once it
    passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
