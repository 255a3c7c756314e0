"""Closing a socket for real: asyncio (and uvloop) close a transport's socket a loop turn after
`close()`, in `connection_lost`. Until then its port is taken (an agent restarted in the same
process could not bind it again), and a loop stopped first leaves the socket open, warned of
when the transport is collected."""

from __future__ import annotations

import asyncio

__all__ = ["CLOSE_WAIT", "wait_closed"]

# Seconds to wait for a closing socket to be closed (its unsent bytes flushed) before aborting.
CLOSE_WAIT = 1.0


async def wait_closed(
    transport: asyncio.Transport | asyncio.DatagramTransport,
    lost: asyncio.Future[None],
    wait: float = CLOSE_WAIT,
) -> None:
    """Wait for `lost` (set by the protocol's `connection_lost`) after the caller closed
    `transport`; abort the transport when `wait` seconds pass first."""
    if lost.done():
        return
    try:
        async with asyncio.timeout(wait):
            await asyncio.shield(lost)
    except TimeoutError:
        transport.abort()
