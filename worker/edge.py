"""The worker's client of the edge router: bootstrap peers, lookups, fallback registration.

Every request is counted by kind and logged, so each worker's share of the edge's daily
request budget is visible. The httpx transport is injectable (an in-process router in tests).
An answer is read within the request's timeout, up to MAX_ANSWER_BYTES, and its JSON to
MAX_ANSWER_DEPTH levels: whatever sits at the edge's address, a worker fails its request, not
itself.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import httpx

from dht_bridge.dht.address import contact_address
from dht_bridge.errors import RecordError
from dht_bridge.httpwire import read_capped
from dht_bridge.jsontext import loads_bounded
from dht_bridge.records import WorkerRecord, parse_and_validate
from dht_bridge.tunnels import TunnelPolicy
from worker.errors import EdgeRefused, EdgeUnavailable

logger = logging.getLogger(__name__)

# A lookup of 100 providers is about 60 KB, a bootstrap answer a few KB.
MAX_ANSWER_BYTES = 1 << 20
MAX_ANSWER_DEPTH = 16  # a lookup answer nests 4 levels
# Peers taken from one bootstrap answer: the edge hands out a few; a join needs one.
MAX_PEERS = 64
# How long a bootstrap answer stays good when the edge names no usable ttl, and at most: an
# edge that said "for ever" (or 10^400 s) would otherwise never be asked for peers again.
DEFAULT_PEERS_TTL = 60.0
MAX_PEERS_TTL = 86400.0
# A DNS label as resolvers take it: a longer one makes getaddrinfo raise UnicodeError.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


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
        self.timeout = timeout
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
        for item in named[:MAX_PEERS]:
            if not isinstance(item, dict):
                continue
            host, port = item.get("host"), item.get("port")
            if _peer_host(host) and type(port) is int and 0 < port < 65536:
                peers.append((host, port))
                if item.get("kind") == "coordinator":
                    coordinators.append((host, port))
        if not peers or len(peers) < min(len(named), MAX_PEERS):
            # Else the agent only says it could not join: this says the edge was the cause.
            logger.warning(
                "GET /dht/bootstrap: %d of the %d peers the edge named are usable "
                "(each needs an IP address or DNS name and a port from 1 to 65535; %d are "
                "read at most)",
                len(peers),
                len(named),
                MAX_PEERS,
            )
        ttl = body.get("ttl") if isinstance(body, dict) else None
        return BootstrapPeers(tuple(peers), _peers_ttl(ttl), tuple(coordinators))

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
        listed = body.get("providers") if isinstance(body, dict) else None
        for item in listed[:limit] if isinstance(listed, list) else []:
            try:
                found.append(parse_and_validate(item, self.policy, now=now))
            except RecordError as exc:
                logger.debug("ignored a provider the edge listed for %s: %s", service, exc)
        return found

    async def register(self, record: WorkerRecord) -> Registered:
        """POST /workers: register or heartbeat through the edge."""
        response, body = await self._send("register", "POST", "/workers", json=record.to_dict())
        if response.status_code == 409:
            return Registered.STALE
        self._check(response, body)
        return Registered.STORED_IN_DHT if response.status_code == 202 else Registered.APPLIED

    async def leave(self, tombstone: WorkerRecord) -> None:
        """DELETE /workers/{id} with the signed tombstone."""
        response, body = await self._send(
            "leave", "DELETE", f"/workers/{tombstone.worker_id}", json=tombstone.to_dict()
        )
        if response.status_code != 409:  # an equal or newer tombstone is there: fine
            self._check(response, body)

    async def _json(self, kind: str, method: str, path: str, **kwargs: Any) -> Any:
        response, body = await self._send(kind, method, path, **kwargs)
        self._check(response, body)
        try:
            return loads_bounded(body, max_depth=MAX_ANSWER_DEPTH)
        except ValueError as exc:
            raise EdgeUnavailable(f"{method} {path}: the answer is not JSON ({exc})") from exc

    async def _send(
        self, kind: str, method: str, path: str, **kwargs: Any
    ) -> tuple[httpx.Response, bytes]:
        """The answer and its body, read within the timeout and up to MAX_ANSWER_BYTES."""
        self.counts[kind] += 1
        failure: Exception | None = None
        try:
            async with asyncio.timeout(self.timeout):
                response, body = await self._read(
                    self._client.build_request(method, path, **kwargs)
                )
            why = "" if body is not None else f"the answer is over {MAX_ANSWER_BYTES} bytes"
        except (httpx.HTTPError, TimeoutError) as exc:
            failure = exc
            why = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                why = f"no whole answer within {self.timeout:g} s"
        if why:
            logger.info(
                "edge request %s %s failed: %s (edge requests: %s)",
                method,
                path,
                why,
                self._summary(),
            )
            raise EdgeUnavailable(f"{method} {path}: {why}") from failure
        assert body is not None
        logger.info(
            "edge request %s %s -> %d (edge requests: %s)",
            method,
            path,
            response.status_code,
            self._summary(),
        )
        return response, body

    async def _read(self, request: httpx.Request) -> tuple[httpx.Response, bytes | None]:
        """The answer and its body; None for a body over MAX_ANSWER_BYTES."""
        response = await self._client.send(request, stream=True)
        try:
            return response, await read_capped(response, MAX_ANSWER_BYTES)
        finally:
            await response.aclose()

    def _summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
        return f"{self.total} ({kinds})"

    @staticmethod
    def _check(response: httpx.Response, body: bytes) -> None:
        if response.is_success:
            return
        text = body[:200].decode("utf-8", "replace")
        try:
            answer = loads_bounded(body, max_depth=MAX_ANSWER_DEPTH)
            detail = str(answer.get("detail") or answer.get("error") or text)[:200]
        except (ValueError, AttributeError):
            detail = text
        if response.status_code >= 500 or response.status_code == 429:
            raise EdgeUnavailable(f"edge answered {response.status_code}: {detail}")
        raise EdgeRefused(response.status_code, detail)


def _peer_host(host: object) -> TypeGuard[str]:
    """Whether a bootstrap answer's `host` is an IP address or a DNS name a resolver takes."""
    if not isinstance(host, str) or not 0 < len(host) <= 253:
        return False
    if contact_address(host, 1) is not None:
        return True
    return all(_HOST_LABEL.fullmatch(label) for label in host.removesuffix(".").split("."))


def _peers_ttl(ttl: object) -> float:
    """A bootstrap answer's `ttl` in seconds: a finite number above 0, at most MAX_PEERS_TTL."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        return DEFAULT_PEERS_TTL
    try:
        seconds = float(ttl)
    except OverflowError:  # an integer of hundreds of digits
        return MAX_PEERS_TTL if ttl > 0 else DEFAULT_PEERS_TTL
    if not math.isfinite(seconds) or seconds <= 0:
        return DEFAULT_PEERS_TTL
    return min(seconds, MAX_PEERS_TTL)
