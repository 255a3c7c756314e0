"""Tunnel proof at the router (issue 20): a worker whose tunnel answers the signed challenge is
preferred; a record naming a URL that answers for another key is never routed; `require`
routes to proved workers only; a proof endpoint that hangs costs routing nothing.

Real HTTP on loopback: the router app runs in process (its own httpx client fetches the
proofs), the workers' services are uvicorn servers wrapped in the worker's ProofMiddleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.tunnel_proof import PROOF_PATH, Outcome
from edge_router.config import RouterConfig
from edge_router.errors import NoProvider
from edge_router.upstream.proof import ProofSettings, TunnelProver
from tests.support.helpers import ManualClock, make_record, wait_for
from tests.support.router import ADMIN_TOKEN, LOOPBACK, client_for, router_app
from tests.support.upstreams import Upstream, serve, url_of
from worker.proof import ProofMiddleware

PROVED_WITHIN = 15.0


@dataclass
class Volunteer:
    """A worker's key and the URL its record names (what ProofMiddleware reads of an agent)."""

    name: str
    identity: Identity | None = field(default_factory=Identity.generate)
    tunnel_url: str = ""

    def record(
        self, *, tunnel_url: str | None = None, seq: int = 1, tombstone: bool = False
    ) -> WorkerRecord:
        """A signed record of this worker naming `tunnel_url` (its own by default)."""
        assert self.identity is not None
        return make_record(
            self.identity, tunnel_url=tunnel_url or self.tunnel_url, seq=seq, tombstone=tombstone
        )


def service_app(volunteer: Volunteer) -> Starlette:
    """The volunteer's service: says whose it is; the proof path answered by the middleware."""

    async def work(request: Request) -> Response:
        return JSONResponse({"served_by": volunteer.name})

    app = Starlette(routes=[Route("/{path:path}", work, methods=["GET", "POST"])])
    app.add_middleware(ProofMiddleware, agent=lambda: volunteer)
    return app


@contextlib.asynccontextmanager
async def running(volunteer: Volunteer) -> AsyncIterator[str]:
    """Serve the volunteer's service; its tunnel URL is that server's URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    volunteer.tunnel_url = url_of(sock)
    async with serve(service_app(volunteer), sock=sock) as url:
        yield url


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """The in-process registry, admitting loopback tunnel URLs."""
    registry = open_registry(RegistrySettings(), policy=LOOPBACK)
    try:
        yield registry
    finally:
        await registry.aclose()


def config(mode: str) -> RouterConfig:
    return RouterConfig(policy=LOOPBACK, admin_token=ADMIN_TOKEN, tunnel_proof=mode)


async def verdict_is(prover: TunnelProver, record: WorkerRecord, outcome: Outcome) -> None:
    def settled() -> bool:
        verdict = prover.verdict(record)
        return verdict is not None and verdict.outcome is outcome

    await wait_for(settled, timeout=PROVED_WITHIN, message=f"{record.worker_id} {outcome.value}")


async def routed_to(client: httpx.AsyncClient, times: int) -> set[str]:
    workers = set()
    for _ in range(times):
        answer = await client.get("/route/ocr/job")
        assert answer.status_code == 200, answer.text
        workers.add(answer.headers["x-rma-worker"])
    return workers


async def test_a_worker_whose_tunnel_answers_the_proof_is_preferred(registry: Registry) -> None:
    proving = Volunteer("proving")
    plain = Upstream("plain")  # a service with no proof endpoint: what workers run today
    async with running(proving), plain.running() as plain_url:
        unproved = Volunteer("plain", tunnel_url=plain_url).record()
        proved = proving.record()
        await registry.upsert(proved)
        await registry.upsert(unproved)
        app = router_app(registry, config=config("prefer"))
        async with client_for(app) as client:
            # Nothing is proved yet: both are routed (prefer), and both are queued for proof.
            first = await client.get("/route/ocr/job")
            assert first.status_code == 200, first.text
            prover = prover_of_app(app)
            await verdict_is(prover, proved, Outcome.PROVED)
            await verdict_is(prover, unproved, Outcome.FAILED)
            assert await routed_to(client, 30) == {proved.worker_id}


async def test_a_record_naming_a_url_that_answers_for_another_key_is_never_routed(
    registry: Registry,
) -> None:
    victim = Volunteer("victim")
    squatter = Volunteer("squatter")
    async with running(victim), running(squatter):
        # The squatter signs a record naming the victim's tunnel URL: its own key, not theirs.
        honest = victim.record()
        forged = squatter.record(tunnel_url=victim.tunnel_url)
        await registry.upsert(honest)
        await registry.upsert(forged)
        app = router_app(registry, config=config("prefer"))
        async with client_for(app) as client:
            await client.get("/route/ocr/job")  # queues both for proof
            prover = prover_of_app(app)
            await verdict_is(prover, honest, Outcome.PROVED)
            await verdict_is(prover, forged, Outcome.FOREIGN)
            verdict = prover.verdict(forged)
            assert verdict is not None
            assert victim.identity is not None
            assert victim.identity.worker_id in verdict.why
            assert await routed_to(client, 30) == {honest.worker_id}

            # Once the victim leaves, the squatter's record is all there is: still never routed.
            tombstone = victim.record(seq=2, tombstone=True)
            gone = await client.request(
                "DELETE", f"/workers/{honest.worker_id}", json=tombstone.to_dict()
            )
            assert gone.status_code == 200, gone.text
            refused = await client.get("/route/ocr/job")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "no_provider"
            assert "1 answering for another worker's key" in refused.json()["detail"]


async def test_require_mode_refuses_unproved_workers(registry: Registry) -> None:
    proving = Volunteer("proving")
    plain = Upstream("plain")
    async with running(proving), plain.running() as plain_url:
        unproved = Volunteer("plain", tunnel_url=plain_url).record()
        await registry.upsert(unproved)
        app = router_app(registry, config=config("require"))
        async with client_for(app) as client:
            refused = await client.get("/route/ocr/job")
            assert refused.status_code == 503, refused.text
            assert "1 not proved yet" in refused.json()["detail"]
            prover = prover_of_app(app)
            await verdict_is(prover, unproved, Outcome.FAILED)
            assert (await client.get("/route/ocr/job")).status_code == 503
            # No routed request reached the unproved worker (its proof fetches are not counted).
            assert plain.seen == []

            # A worker that proves itself becomes routable once its proof is in.
            proved = proving.record()
            await registry.upsert(proved)
            await client.post(
                "/admin/cache/flush",
                json={},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            await client.get("/route/ocr/job")  # queues it
            await verdict_is(prover, proved, Outcome.PROVED)
            assert await routed_to(client, 10) == {proved.worker_id}


@contextlib.asynccontextmanager
async def hanging_proof() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A service that serves work but never answers its proof path (until released)."""
    release = asyncio.Event()

    async def proof(request: Request) -> Response:
        await release.wait()
        return JSONResponse({})

    async def work(request: Request) -> Response:
        return JSONResponse({"served_by": "hanging"})

    app = Starlette(routes=[Route(PROOF_PATH, proof), Route("/{path:path}", work)])
    async with serve(app) as url:
        try:
            yield url, release
        finally:
            release.set()  # uvicorn waits for its handlers before it stops


async def test_a_proof_endpoint_that_hangs_does_not_block_routing(registry: Registry) -> None:
    async with hanging_proof() as (url, _):
        record = Volunteer("hanging", tunnel_url=url).record()
        await registry.upsert(record)
        app = router_app(registry, config=config("prefer"))
        async with client_for(app) as client:
            prover = prover_of_app(app)
            assert (await client.get("/route/ocr/job")).status_code == 200  # queues the proof
            await wait_for(lambda: prover.fetches == 1, timeout=5, message="the proof fetch")
            # Requests answer at once while the proof of their worker hangs.
            for _ in range(5):
                answer = await asyncio.wait_for(client.get("/route/ocr/job"), timeout=2)
                assert answer.status_code == 200, answer.text
            assert prover.fetches == 1  # one fetch in flight, not one per request
            verdict = prover.verdict(record)
            assert verdict is None or verdict.outcome is Outcome.FAILED


async def test_a_hanging_proof_times_out_as_failed(registry: Registry) -> None:
    async with hanging_proof() as (url, _), httpx.AsyncClient(trust_env=False) as http:
        record = Volunteer("hanging", tunnel_url=url).record()
        prover = TunnelProver(http, ProofSettings(timeout=0.3))
        verdict = await asyncio.wait_for(prover.prove(record), timeout=5)
    assert verdict.outcome is Outcome.FAILED
    assert "no answer within 0.3 s" in verdict.why


@pytest.mark.parametrize(
    ("body", "why"),
    [(b"[" * 2048 + b"]" * 2048, "nests deeper than 4"), (b"\xff{", "not JSON")],
)
async def test_a_tunnel_answering_hostile_json_fails_its_proof(body: bytes, why: str) -> None:
    async def proof(request: Request) -> Response:
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route(PROOF_PATH, proof)])
    async with serve(app) as url, httpx.AsyncClient(trust_env=False) as http:
        record = Volunteer("hostile", tunnel_url=url).record()
        verdict = await asyncio.wait_for(TunnelProver(http, ProofSettings()).prove(record), 5)
    assert verdict.outcome is Outcome.FAILED
    assert why in verdict.why


def prover_of_app(app: Starlette) -> TunnelProver:
    prover: TunnelProver = app.state.tunnel_proof
    return prover


async def test_off_mode_fetches_nothing(registry: Registry) -> None:
    plain = Upstream("plain")
    async with plain.running() as url:
        await registry.upsert(Volunteer("plain", tunnel_url=url).record())
        app = router_app(registry, config=config("off"))
        async with client_for(app) as client:
            assert (await client.get("/route/ocr/job")).status_code == 200
            assert prover_of_app(app).fetches == 0
    assert [seen["raw_path"] for seen in plain.seen] == ["/job"]


async def test_proofs_are_renewed_on_schedule_and_a_failed_renewal_does_not_undo_them() -> None:
    volunteer = Volunteer("renewing")
    clock = ManualClock(1000.0)
    async with running(volunteer), httpx.AsyncClient(trust_env=False) as http:
        record = volunteer.record()
        settings = ProofSettings(mode="require", reprove=3600.0, retry=300.0)
        prover = TunnelProver(http, settings, clock=clock)
        prover.start()
        try:

            async def proved_at(at: float) -> None:
                def renewed() -> bool:
                    verdict = prover.verdict(record)
                    return verdict is not None and verdict.at == at

                await wait_for(renewed, timeout=PROVED_WITHIN, message=f"proved at {at}")

            with pytest.raises(NoProvider):
                prover.routable("ocr", [record])  # not proved yet: queued
            await proved_at(1000.0)
            assert prover.routable("ocr", [record]) == [record]
            assert prover.fetches == 1
            clock.advance(3599.0)
            prover.routable("ocr", [record])
            assert prover.fetches == 1  # not due yet: routes cost no fetch

            clock.advance(1.0)
            prover.routable("ocr", [record])  # due: proved again, routed meanwhile
            await proved_at(4600.0)
            assert prover.fetches == 2

            # The worker's proof endpoint breaks (503): its renewal fails, the proof stands...
            identity, volunteer.identity = volunteer.identity, None
            clock.advance(3600.0)
            assert prover.routable("ocr", [record]) == [record]

            def retry_planned() -> bool:
                verdict = prover.verdict(record)
                return verdict is not None and verdict.due == clock.now + 300.0

            await wait_for(retry_planned, timeout=PROVED_WITHIN, message="the renewal failed")
            verdict = prover.verdict(record)
            assert verdict is not None
            assert (verdict.outcome, verdict.at) == (Outcome.PROVED, 4600.0)
            assert prover.routable("ocr", [record]) == [record]
            assert prover.fetches == 3  # retried after `retry`, not on every request

            # ... until it is two intervals old: then it is refused.
            clock.advance(3600.0)
            with pytest.raises(NoProvider, match="1 not proved yet"):
                prover.routable("ocr", [record])

            # A worker that answers again is proved again.
            volunteer.identity = identity
            await proved_at(clock.now)
            assert prover.routable("ocr", [record]) == [record]
        finally:
            await prover.aclose()
