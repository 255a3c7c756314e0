"""The bridge's figures, and its `/metrics` and `/healthz` endpoint.

The bridge serves its own `/metrics` (and `/healthz`) rather than writing figures where the router
reads them: a bridge is a separate process, often on another machine, and an operator scrapes it
like any exporter. The figures are plain counters kept where the bridge works, exposed at scrape
time through prometheus_client (see `dht_bridge.exposition`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dht_bridge.exposition import FiguresCollector, process_registry
from dht_bridge.version import __version__

logger = logging.getLogger(__name__)


@dataclass
class BridgeCounters:
    """What the bridge has done since it started (counters) and when (unix times, 0 = never)."""

    merged_to_redis: int = 0
    merged_to_dht: int = 0
    publish_attempts: int = 0
    publish_failures: int = 0
    journaled: int = 0
    journal_failures: int = 0
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
    "rma_bridge_journal_write_failures_total": (
        "counter",
        "Journal writes that failed (a full disk); their records wait in memory.",
    ),
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
    "rma_bridge_dht_keys": ("gauge", "Keys the bridge node holds (at most 50,000)."),
    "rma_bridge_dht_keys_refused_total": (
        "counter",
        "New keys the bridge node refused: its storage full, or the sender over its quota.",
    ),
    "rma_bridge_dht_refused_total": (
        "counter",
        "Requests the bridge node dropped unread or STOREs it refused unchecked: the sender "
        "over its budget of requests or of signature checks (one host flooding).",
    ),
}


class MetricsServer:
    """The bridge's `GET /metrics` (prometheus_client's exposition, process figures included)
    and `GET /healthz` (200 while it syncs both sides, 503 with what is down otherwise)."""

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
        self.registry = process_registry()
        self.registry.register(FiguresCollector(figures, METRICS))
        self._app = Starlette(
            routes=[
                Route("/metrics", self._metrics, methods=["GET", "HEAD"]),
                Route("/healthz", self._health, methods=["GET", "HEAD"]),
            ]
        )
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._address: tuple[str, int] | None = None

    async def start(self) -> None:
        """Bind and serve (port 0: the OS picks); OSError when the port is taken."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET  # ::1, [::]
        sock = socket.create_server((self._host, self._port), family=family, reuse_port=False)
        host, port = sock.getsockname()[:2]
        self._address = (str(host), int(port))
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[sock]), name="bridge-metrics"
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        if self._address is None:
            raise RuntimeError("metrics server is not started")
        return self._address

    async def aclose(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _health(self, request: Request) -> JSONResponse:
        figures = self._figures()
        redis_up = bool(figures.get("rma_bridge_redis_up"))
        dht_up = bool(figures.get("rma_bridge_dht_up"))
        # A bridge with one side cut off keeps what it can (the journal, Redis serving the
        # edge), but it is not syncing: an orchestrator or a probe should see that.
        status = "ok" if redis_up and dht_up else "degraded" if redis_up or dht_up else "down"
        body = {"status": status, "redis": redis_up, "dht": dht_up, "version": __version__}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: the bridge process owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


__all__ = ["METRICS", "BridgeCounters", "MetricsServer"]
