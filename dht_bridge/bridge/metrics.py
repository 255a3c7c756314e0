"""The bridge's figures and a small HTTP endpoint serving them as Prometheus text.

The bridge serves its own `/metrics` (and `/healthz`) rather than writing figures where the router
reads them: a bridge is a separate process, often on another machine, and an operator scrapes it
like any exporter. Plain asyncio streams: the endpoint answers two paths and needs no framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8192


@dataclass
class BridgeCounters:
    """What the bridge has done since it started (counters) and when (unix times, 0 = never)."""

    merged_to_redis: int = 0
    merged_to_dht: int = 0
    publish_attempts: int = 0
    publish_failures: int = 0
    journaled: int = 0
    replayed: int = 0
    redis_outages: int = 0
    dht_outages: int = 0
    bootstrap_attempts: int = 0
    syncs: int = 0
    vanished_reads: int = 0
    held: int = 0
    released: int = 0
    last_redis_sync: float = 0.0
    last_dht_sync: float = 0.0


# name -> (type, help); the values come from `Bridge.figures()`.
METRICS: dict[str, tuple[str, str]] = {
    "rma_bridge_sync_lag_seconds": (
        "gauge",
        "Age of the oldest change received from the DHT and not yet in Redis (0: none waits).",
    ),
    "rma_bridge_journal_records": ("gauge", "Entries in the local journal, waiting for Redis."),
    "rma_bridge_journal_bytes": ("gauge", "Size of the local journal."),
    "rma_bridge_journal_dropped_total": ("counter", "Records refused by a full journal."),
    "rma_bridge_journaled_total": ("counter", "Records written to the journal."),
    "rma_bridge_replayed_total": ("counter", "Journal records replayed into Redis."),
    "rma_bridge_merged_to_redis_total": ("counter", "Records applied in Redis (DHT to Redis)."),
    "rma_bridge_merged_to_dht_total": ("counter", "Records published into the DHT (Redis to DHT)."),
    "rma_bridge_publish_attempts_total": ("counter", "Publishes into the DHT tried."),
    "rma_bridge_publish_failures_total": ("counter", "Publishes into the DHT that failed."),
    "rma_bridge_redis_up": ("gauge", "1 while Redis answers."),
    "rma_bridge_dht_up": ("gauge", "1 while a DHT contact answers."),
    "rma_bridge_redis_outages_total": ("counter", "Times Redis was found unreachable."),
    "rma_bridge_dht_outages_total": ("counter", "Times the DHT side was found cut off."),
    "rma_bridge_bootstrap_attempts_total": ("counter", "Rejoin attempts through bootstrap peers."),
    "rma_bridge_last_redis_sync_timestamp": ("gauge", "Unix time of the last good Redis sync."),
    "rma_bridge_last_dht_sync_timestamp": ("gauge", "Unix time of the last good DHT read."),
    "rma_bridge_last_redis_sync_age_seconds": ("gauge", "Seconds since the last good Redis sync."),
    "rma_bridge_last_dht_sync_age_seconds": ("gauge", "Seconds since the last good DHT read."),
    "rma_bridge_self_preservation": ("gauge", "1 while lapsing records are held as stale."),
    "rma_bridge_held_records": ("gauge", "Records this bridge holds in Redis as stale."),
    "rma_bridge_released_total": ("counter", "Held records removed after the DHT came back."),
    "rma_bridge_syncs_total": ("counter", "Anti-entropy passes completed."),
    "rma_bridge_vanished_reads_total": (
        "counter",
        "Own-key reads of live workers a shard walk missed.",
    ),
    "rma_bridge_known_services": ("gauge", "Services whose DHT shards are polled."),
    "rma_bridge_dht_contacts": ("gauge", "Contacts in the bridge node's routing table."),
}


def render(figures: Mapping[str, float]) -> str:
    """Prometheus text exposition of the bridge's figures."""
    lines: list[str] = []
    for name, value in sorted(figures.items()):
        kind, text = METRICS.get(name, ("gauge", name))
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {value:g}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Answers `GET /metrics` (Prometheus text) and `GET /healthz` (JSON) on host:port."""

    def __init__(
        self,
        figures: Callable[[], Mapping[str, float]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._figures = figures
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind and serve (port 0: the OS picks); OSError when the port is taken."""
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("metrics server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def aclose(self) -> None:
        """Stop accepting and close the listening socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, kind = self._answer(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, body, kind = "400 Bad Request", b"bad request\n", "text/plain"
        except ConnectionError:
            writer.close()
            return
        try:
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > MAX_REQUEST_BYTES:
            return "431 Request Header Fields Too Large", b"too large\n", "text/plain"
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        figures = self._figures()
        if path == "/metrics":
            return (
                "200 OK",
                render(figures).encode(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        if path == "/healthz":
            redis_up = bool(figures.get("rma_bridge_redis_up"))
            dht_up = bool(figures.get("rma_bridge_dht_up"))
            status = "ok" if redis_up and dht_up else "degraded"
            body = {"status": status, "redis": redis_up, "dht": dht_up}
            return "200 OK", json.dumps(body).encode(), "application/json"
        return "404 Not Found", b"not found\n", "text/plain"


__all__ = ["METRICS", "BridgeCounters", "MetricsServer", "render"]
