"""Shared test helpers: condition waits with deadlines (never bare sleeps) and record factories."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, sign_record
from dht_bridge.tunnels import TunnelPolicy

POLICY = TunnelPolicy()


class ManualClock:
    """A clock that tests move forward instead of sleeping (wall or monotonic alike)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,  # noqa: ASYNC109 - a deadline for polling, not a cancel scope
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> None:
    """Poll `condition` until it is true; fail the test with `message` after `timeout` seconds
    (a callable message is read then: a log's tail at the time of the failure)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            said = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {said}")
        await asyncio.sleep(interval)


def make_record(
    identity: Identity | None = None,
    *,
    services: Iterable[str] = ("ocr",),
    seq: int = 1,
    now: float | None = None,
    ttl: float = 90.0,
    load: float = 0.0,
    region: str = "",
    tunnel_url: str | None = None,
    **fields: Any,
) -> WorkerRecord:
    """A validly signed record; a fresh identity unless one is given."""
    identity = identity or Identity.generate()
    return sign_record(
        identity,
        tunnel_url=tunnel_url or f"https://w-{identity.worker_id[:12]}.trycloudflare.com",
        services=services,
        seq=seq,
        now=time.time() if now is None else now,
        ttl=ttl,
        load=load,
        region=region,
        **fields,
    )


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port the OS just handed out on 127.0.0.1 (for servers that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
