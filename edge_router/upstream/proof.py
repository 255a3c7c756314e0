"""Tunnel proof, the router's side: route to a record's tunnel URL only once that URL has shown
it reaches the record's key (see dht_bridge.tunnel_proof for the challenge).

Anyone can publish a signed record naming someone else's tunnel URL: a key and a quick tunnel
cost nothing. So the router fetches `{tunnel_url}/.well-known/rma-proof?c=<nonce>` and checks
the signature with the record's key. Verdicts are kept per (worker_id, tunnel_url) and proved
again on a schedule. The fetches run in background tasks owned by the app's lifespan; a routed
request only reads the verdicts (an unknown pair is queued for proof, never awaited).

Modes (`RMA_TUNNEL_PROOF`): `off` routes as before; `prefer` (the default, while workers
upgrade) routes among proved providers when one is healthy, else among the unproved too;
`require` routes to proved providers only. In every mode but `off`, a URL that answers for
another key is never routed to for that record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cachetools
import httpx
from starlette.requests import Request

from dht_bridge.errors import RecordError
from dht_bridge.httpwire import read_capped
from dht_bridge.jsontext import loads_bounded
from dht_bridge.records import WorkerRecord
from dht_bridge.tunnel_proof import (
    NONCE_PARAM,
    PROOF_PATH,
    Outcome,
    ProofCheck,
    check_proof,
    new_nonce,
)
from edge_router.config import PROOF_MODES, PROOF_OFF, PROOF_PREFER, PROOF_REQUIRE
from edge_router.errors import NoProvider
from edge_router.upstream.proxy import upstream_url

__all__ = [
    "PROOF_MODES",
    "PROOF_OFF",
    "PROOF_PREFER",
    "PROOF_REQUIRE",
    "ProofSettings",
    "TunnelProver",
    "Verdict",
    "prover_of",
]

logger = logging.getLogger(__name__)

# A proved (or foreign) pair is proved again after this long: one fetch per routed worker an
# hour. A tunnel URL changes hands only when its tunnel stops, and a quick tunnel's name is new
# every start, so an hour's trust in a URL that did answer is a small window.
DEFAULT_REPROVE = 3600.0
# A failed proof (the worker was down, or has no proof endpoint yet) is tried again sooner; a
# failed re-proof leaves the earlier outcome standing until it is two re-proof intervals old.
DEFAULT_RETRY = 300.0
# One fetch, connect to last byte.
DEFAULT_TIMEOUT = 5.0
DEFAULT_CONCURRENCY = 8
# Pairs waiting for a fetch; beyond this, new ones wait for a later routed request to queue them.
DEFAULT_QUEUE = 1024
DEFAULT_MAX_ENTRIES = 10_000
# A proof answer is about 300 bytes; a tunnel that sends more is not answering a proof.
MAX_ANSWER_BYTES = 4096
MAX_ANSWER_DEPTH = 4

Pair = tuple[str, str]


@dataclass(frozen=True)
class ProofSettings:
    """The mode, the re-proof schedule and the bounds of the background fetches."""

    mode: str = PROOF_PREFER
    reprove: float = DEFAULT_REPROVE
    retry: float = DEFAULT_RETRY
    timeout: float = DEFAULT_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    queue: int = DEFAULT_QUEUE
    max_entries: int = DEFAULT_MAX_ENTRIES


@dataclass(frozen=True)
class Verdict:
    """What the last answers showed of one (worker, tunnel URL) pair: the outcome, when it was
    established and when to prove again (monotonic seconds), and why."""

    outcome: Outcome
    at: float
    due: float
    why: str


class TunnelProver:
    """Proves providers' tunnel URLs in the background and filters what a route may use.

    `client` is the router's httpx client (inject a test transport, or use real local servers);
    `available` says whether the proxy would pick a worker now (not ejected or busy), so that
    `prefer` falls back to unproved providers when no proved one can take a request.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        settings: ProofSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        available: Callable[[str], bool] = lambda worker_id: True,
    ) -> None:
        self.client = client
        self.settings = settings or ProofSettings()
        self._clock = clock
        self._available = available
        self._verdicts: cachetools.LRUCache[Pair, Verdict] = cachetools.LRUCache(
            maxsize=self.settings.max_entries
        )
        self._queue: asyncio.Queue[WorkerRecord] = asyncio.Queue(maxsize=self.settings.queue)
        self._pending: set[Pair] = set()
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0

    @property
    def enabled(self) -> bool:
        """False in mode `off`: nothing is fetched and routing is unchanged."""
        return self.settings.mode != PROOF_OFF

    # The hot path: reads only.

    def verdict(self, record: WorkerRecord) -> Verdict | None:
        """The verdict in force for the record's pair, or None when it has none yet."""
        return self._verdicts.get((record.worker_id, record.tunnel_url))

    def routable(self, service: str, providers: Sequence[WorkerRecord]) -> list[WorkerRecord]:
        """The providers a route may use now, by mode; queues unknown and due pairs for proof.

        Raises NoProvider when there are providers but the mode leaves none of them.
        """
        if not self.enabled or not providers:
            return list(providers)
        now = self._clock()
        proved: list[WorkerRecord] = []
        unproved: list[WorkerRecord] = []
        foreign = 0
        for record in providers:
            verdict = self._current(record, now)
            if verdict is None or verdict.outcome is Outcome.FAILED:
                unproved.append(record)
            elif verdict.outcome is Outcome.PROVED:
                proved.append(record)
            else:
                foreign += 1
        # `prefer` still routes when every proved provider is ejected or busy.
        usable = any(r.live and self._available(r.worker_id) for r in proved)
        chosen = proved if self.settings.mode == PROOF_REQUIRE or usable else proved + unproved
        if not chosen:
            raise NoProvider(
                f"no provider of {service!r} has proved its tunnel URL: {len(unproved)} not "
                f"proved yet, {foreign} answering for another worker's key"
            )
        return chosen

    def _current(self, record: WorkerRecord, now: float) -> Verdict | None:
        pair = (record.worker_id, record.tunnel_url)
        verdict = self._verdicts.get(pair)
        if verdict is None:
            self._enqueue(pair, record)
            return None
        if now >= verdict.due:
            self._enqueue(pair, record)
        if verdict.outcome is not Outcome.FAILED and now - verdict.at >= 2 * self.settings.reprove:
            return None  # an answer this old stands for nothing while the new proofs fail
        return verdict

    def _enqueue(self, pair: Pair, record: WorkerRecord) -> None:
        if pair in self._pending:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            logger.debug("proof queue full: worker %s waits for a later request", pair[0])
            return
        self._pending.add(pair)

    # The background side.

    def start(self) -> None:
        """Start the proof fetchers (in the running loop); `aclose` stops them."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tunnel-proof")

    async def aclose(self) -> None:
        """Stop the fetchers; pairs still queued are forgotten."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for index in range(max(self.settings.concurrency, 1)):
                group.create_task(self._fetcher(), name=f"tunnel-proof-{index}")

    async def _fetcher(self) -> None:
        while True:
            record = await self._queue.get()
            pair = (record.worker_id, record.tunnel_url)
            try:
                await self.prove(record)
            except Exception:  # one odd answer must not stop every later proof
                logger.exception("tunnel proof of worker %s failed", record.worker_id)
            finally:
                self._pending.discard(pair)

    async def prove(self, record: WorkerRecord) -> Verdict:
        """Fetch a fresh proof through the record's tunnel URL, judge it, and keep the verdict."""
        nonce = new_nonce()
        self.fetches += 1
        check = await self._fetch_and_check(record, nonce)
        now = self._clock()
        pair = (record.worker_id, record.tunnel_url)
        before = self._verdicts.get(pair)
        if check.outcome is not Outcome.FAILED:
            verdict = Verdict(check.outcome, now, now + self.settings.reprove, check.why)
        elif before is not None and before.outcome is not Outcome.FAILED:
            # One failed re-proof (a blip on the tunnel) does not undo what the URL showed an
            # hour ago: the old outcome stands, tried again soon, until it is two intervals old.
            verdict = Verdict(before.outcome, before.at, now + self.settings.retry, before.why)
            logger.info(
                "tunnel proof of worker %s at %s failed (%s): %s stands, trying again in %g s",
                record.worker_id,
                record.tunnel_url,
                check.why,
                before.outcome.value,
                self.settings.retry,
            )
        else:
            verdict = Verdict(Outcome.FAILED, now, now + self.settings.retry, check.why)
        self._verdicts[pair] = verdict
        if before is None or before.outcome is not verdict.outcome:
            log = logger.warning if verdict.outcome is Outcome.FOREIGN else logger.info
            log(
                "tunnel proof of worker %s at %s: %s (%s)",
                record.worker_id,
                record.tunnel_url,
                verdict.outcome.value,
                verdict.why,
            )
        return verdict

    async def _fetch_and_check(self, record: WorkerRecord, nonce: str) -> ProofCheck:
        target = f"{PROOF_PATH}?{NONCE_PARAM}={nonce}".encode("ascii")
        timeout = self.settings.timeout
        try:
            url = upstream_url(record.tunnel_url, target)
            request = httpx.Request(
                "GET",
                url,
                headers={"accept": "application/json"},
                extensions={"timeout": httpx.Timeout(timeout).as_dict()},
            )
            # The whole exchange is bounded, not each read: a tunnel that trickles bytes
            # must not hold a fetcher.
            async with asyncio.timeout(timeout):
                response = await self.client.send(request, stream=True)
                try:
                    if response.status_code != 200:
                        return ProofCheck(Outcome.FAILED, f"HTTP {response.status_code}")
                    body = await read_capped(response, MAX_ANSWER_BYTES)
                finally:
                    await response.aclose()
        except TimeoutError:
            return ProofCheck(Outcome.FAILED, f"no answer within {timeout:g} s")
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
            return ProofCheck(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        if body is None:
            return ProofCheck(Outcome.FAILED, f"an answer over {MAX_ANSWER_BYTES} bytes")
        try:
            # A proof is one flat object: a tunnel's 4 KB of "[" would otherwise raise
            # RecursionError in the fetcher.
            answer = loads_bounded(body, max_depth=MAX_ANSWER_DEPTH)
        except ValueError as exc:
            return ProofCheck(Outcome.FAILED, f"the answer is not JSON ({exc})")
        try:
            return check_proof(
                worker_id=record.worker_id,
                public_key=record.public_key,
                tunnel_url=record.tunnel_url,
                nonce=nonce,
                answer=answer,
            )
        except (ValueError, RecordError) as exc:  # a record that slipped past validation
            return ProofCheck(Outcome.FAILED, f"cannot check: {exc}")


def prover_of(request: Request) -> TunnelProver:
    """The app's prover (set by `create_app`)."""
    prover: TunnelProver = request.app.state.tunnel_proof
    return prover
