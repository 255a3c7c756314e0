"""Listening on `rma:events`: operator flushes and membership changes reach every router replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dht_bridge.backoff import Backoff, BackoffPolicy, ExponentialBackoff
from dht_bridge.errors import RegistryError
from edge_router.handlers import flush_local
from edge_router.state import RouterState

logger = logging.getLogger(__name__)

RESUBSCRIBE = ExponentialBackoff(base=0.5, cap=30.0)


async def listen_for_events(
    state: RouterState, stop: asyncio.Event, policy: BackoffPolicy = RESUBSCRIBE
) -> None:
    """Apply events until `stop` is set, resubscribing with backoff and jitter when Redis drops.

    It polls rather than blocks, and is stopped by the flag rather than by cancellation,
    which redis-py's pubsub read does not reliably honour on Python 3.11.
    """
    backoff = Backoff(policy)
    while not stop.is_set():
        try:
            async with state.registry.subscribe_events() as events:
                state.events_connected = True
                if backoff.attempts:
                    logger.info(
                        "listening for events on %s again, after %d failed attempts",
                        state.registry.channel,
                        backoff.attempts,
                    )
                else:
                    logger.info("listening for events on %s", state.registry.channel)
                backoff.reset()
                while not stop.is_set():
                    event = await events.get()
                    if event is not None:
                        state.events_received += 1
                        apply_event(state, event)
        except RegistryError as exc:
            delay = backoff.next()
            # One warning an outage: a Redis down for an hour would otherwise write a line
            # every backoff cap; the metric rma_events_connected shows the rest.
            log = logger.warning if backoff.attempts == 1 else logger.debug
            log("events connection lost (%s); retrying in %.1fs", exc, delay)
        else:
            delay = backoff.next()
        finally:
            state.events_connected = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def apply_event(state: RouterState, event: dict[str, Any]) -> None:
    """Flush what an event makes stale. Heartbeats (load changes) do not flush: the TTL covers
    them, and with thousands of workers they arrive many times a second."""
    kind = event.get("type")
    if kind == "flush":
        service = event.get("service")
        flushed = flush_local(state, service if isinstance(service, str) else None)
        logger.info("flush event (%s): %d entries dropped", service or "all", flushed)
    elif kind == "record":
        if event.get("tombstone"):
            changed = event.get("services") or []
        else:
            changed = event.get("removed") or []
        for service in changed:
            if isinstance(service, str):
                state.lookups.flush(("svc", service))
