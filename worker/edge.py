"""The worker's client of the edge router: bootstrap peers, lookups, fallback registration.

Every request is counted by kind and logged, so each worker's share of the edge's daily
request budget is visible. The httpx transport is injectable (an in-process router in tests).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from dht_bridge.errors import RecordError
from dht_bridge.records import WorkerRecord, parse_and_validate
from dht_bridge.tunnels import TunnelPolicy
from worker.errors import EdgeRefused, EdgeUnavailable

logger = logging.getLogger(__name__)


class Registered(enum.Enum):
    """How the edge took a registration."""

    APPLIED = "applied"  # in the registry
    STORED_IN_DHT = "dht"  # the registry was down; the router put it in the DHT
    STALE = "stale"  # the edge holds an equal or newer seq of this worker


@dataclass(frozen=True)
class BootstrapPeers:
    """DHT peers the edge handed out, and how long they stay good; `coordinators` are the
    peers it marked as coordinators (bridges), which every publish also goes to."""

    peers: tuple[tuple[str, int], ...]
    ttl: float
    coordinators: tuple[tuple[str, int], ...] = ()


class EdgeClient:
    """Talks to the edge router at `base_url`; `counts` holds the requests sent, by kind."""

    def __init__(
        self,
        base_url: str,
        *,
        policy: TunnelPolicy,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            transport=transport,
            timeout=timeout,
            # A proxy variable in a volunteer's shell must not reroute the worker's traffic.
            trust_env=False,
            headers={"User-Agent": "rma-worker"},
        )

    @property
    def total(self) -> int:
        """Requests sent so far, every kind."""
        return sum(self.counts.values())

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def bootstrap(self, *, region: str = "") -> BootstrapPeers:
        """GET /dht/bootstrap: a few live DHT peers."""
        params = {"region": region} if region else {}
        body = await self._json("bootstrap", "GET", "/dht/bootstrap", params=params)
        peers: list[tuple[str, int]] = []
        coordinators: list[tuple[str, int]] = []
        named = body.get("peers") if isinstance(body, dict) else None
        named = named if isinstance(named, list) else []
        for item in named:
            if not isinstance(item, dict):
                continue
            host, port = item.get("host"), item.get("port")
            if isinstance(host, str) and host and isinstance(port, int) and 0 < port < 65536:
                peers.append((host, port))
                if item.get("kind") == "coordinator":
                    coordinators.append((host, port))
        if not peers or len(peers) < len(named):
            # Else the agent only says it could not join: this says the edge was the cause.
            logger.warning(
                "GET /dht/bootstrap: %d of the %d peers the edge named are usable "
                "(each needs a host and a port from 1 to 65535)",
                len(peers),
                len(named),
            )
        ttl = body.get("ttl") if isinstance(body, dict) else None
        good_for = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else 60.0
        return BootstrapPeers(tuple(peers), good_for, tuple(coordinators))

    async def services(
        self, service: str, *, limit: int = 10, region: str = ""
    ) -> list[WorkerRecord]:
        """GET /services/{service}: providers, each verified here (records are self-certifying,
        so a worker need not trust the edge's copy)."""
        params: dict[str, str | int] = {"limit": limit}
        if region:
            params["region"] = region
        body = await self._json("services", "GET", f"/services/{service}", params=params)
        now = self.clock()
        found: list[WorkerRecord] = []
        for item in body.get("providers", []) if isinstance(body, dict) else []:
            try:
                found.append(parse_and_validate(item, self.policy, now=now))
            except RecordError as exc:
                logger.debug("ignored a provider the edge listed for %s: %s", service, exc)
        return found

    async def register(self, record: WorkerRecord) -> Registered:
        """POST /workers: register or heartbeat through the edge."""
        response = await self._send("register", "POST", "/workers", json=record.to_dict())
        if response.status_code == 409:
            return Registered.STALE
        self._check(response)
        return Registered.STORED_IN_DHT if response.status_code == 202 else Registered.APPLIED

    async def leave(self, tombstone: WorkerRecord) -> None:
        """DELETE /workers/{id} with the signed tombstone."""
        response = await self._send(
            "leave", "DELETE", f"/workers/{tombstone.worker_id}", json=tombstone.to_dict()
        )
        if response.status_code != 409:  # an equal or newer tombstone is there: fine
            self._check(response)

    async def _json(self, kind: str, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._send(kind, method, path, **kwargs)
        self._check(response)
        try:
            return response.json()
        except ValueError as exc:
            raise EdgeUnavailable(f"{method} {path}: the answer is not JSON") from exc

    async def _send(self, kind: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self.counts[kind] += 1
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            logger.info(
                "edge request %s %s failed: %s (edge requests: %s)",
                method,
                path,
                exc or type(exc).__name__,
                self._summary(),
            )
            raise EdgeUnavailable(f"{method} {path}: {exc or type(exc).__name__}") from exc
        logger.info(
            "edge request %s %s -> %d (edge requests: %s)",
            method,
            path,
            response.status_code,
            self._summary(),
        )
        return response

    def _summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        return f"{self.total} ({kinds})"

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            body = response.json()
            detail = str(body.get("detail") or body.get("error") or response.text)
        except (ValueError, AttributeError):
            detail = response.text[:200]
        if response.status_code >= 500 or response.status_code == 429:
            raise EdgeUnavailable(f"edge answered {response.status_code}: {detail}")
        raise EdgeRefused(response.status_code, detail)
