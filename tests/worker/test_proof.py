"""The worker's side of the tunnel proof (issue 20): ProofMiddleware answers the challenge with
the agent's key and passes every other request on; `rma worker --cloudflared` puts a local
proxy between cloudflared and the service that answers it, so a router that requires the proof
routes to the worker with no port opened and nothing added to the service."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dht_bridge.identity import Identity
from dht_bridge.tunnel_proof import PROOF_PATH, Outcome, check_proof, new_nonce
from tests.support.dht import TEST_SETTINGS
from tests.support.helpers import wait_for
from tests.support.router import LOOPBACK, loopback_router
from tests.support.upstreams import refusing_port, serve, url_of
from tests.worker.test_cloudflared import fake_cloudflared
from worker import ProofMiddleware, ProofProxy
from worker.agent import WorkerAgent
from worker.config import WorkerConfig

TUNNEL = "https://blue-fox-12.trycloudflare.com"


@dataclass
class Source:
    """What the middleware reads of a running agent."""

    identity: Identity | None = field(default_factory=Identity.generate)
    tunnel_url: str = TUNNEL


def app_with(source: Source | None) -> Starlette:
    async def echo(request: Request) -> Response:
        return JSONResponse({"path": request.url.path, "body": (await request.body()).decode()})

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    app.add_middleware(ProofMiddleware, agent=lambda: source)
    return app


def client_of(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc")


def judged(source: Source, nonce: str, answer: httpx.Response) -> Outcome:
    assert source.identity is not None
    return check_proof(
        worker_id=source.identity.worker_id,
        public_key=source.identity.public_key.hex(),
        tunnel_url=source.tunnel_url,
        nonce=nonce,
        answer=answer.json(),
    ).outcome


async def test_the_middleware_answers_the_challenge_with_the_agents_key() -> None:
    source = Source()
    async with client_of(app_with(source)) as client:
        nonce = new_nonce()
        answer = await client.get(PROOF_PATH, params={"c": nonce})
        assert answer.status_code == 200, answer.text
        assert answer.headers["cache-control"] == "no-store"
        assert judged(source, nonce, answer) is Outcome.PROVED
        assert source.identity is not None
        assert answer.json()["worker_id"] == source.identity.worker_id
        # Another nonce's answer proves nothing for this one: no replay.
        assert judged(source, new_nonce(), answer) is Outcome.FAILED
        # Another key's check of this answer sees a foreign worker.
        other = Source()
        assert judged(other, nonce, answer) is Outcome.FOREIGN


async def test_the_middleware_passes_every_other_request_through() -> None:
    async with client_of(app_with(Source())) as client:
        answer = await client.post("/ocr/run", content=b"page")
        assert answer.json() == {"path": "/ocr/run", "body": "page"}
        near = await client.get("/.well-known/rma-proofs", params={"c": new_nonce()})
        assert near.json()["path"] == "/.well-known/rma-proofs"
        nested = await client.get("/x" + PROOF_PATH, params={"c": new_nonce()})
        assert nested.json()["path"] == "/x" + PROOF_PATH


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({}, 400),
        ({"c": "short"}, 400),
        ({"c": "a b" * 12}, 400),
        ({"c": ["a" * 30, "b" * 30]}, 400),
    ],
)
async def test_the_middleware_refuses_a_bad_nonce(query: dict[str, object], status: int) -> None:
    async with client_of(app_with(Source())) as client:
        answer = await client.get(PROOF_PATH, params=query)  # type: ignore[arg-type]
        assert answer.status_code == status
        assert answer.json()["error"] == "bad_request"


async def test_the_middleware_before_the_agent_started_and_for_other_methods() -> None:
    async with client_of(app_with(Source(identity=None))) as client:
        early = await client.get(PROOF_PATH, params={"c": new_nonce()})
        assert early.status_code == 503
    async with client_of(app_with(None)) as client:
        assert (await client.get(PROOF_PATH, params={"c": new_nonce()})).status_code == 503
    async with client_of(app_with(Source())) as client:
        assert (await client.post(PROOF_PATH, params={"c": new_nonce()})).status_code == 405
        head = await client.head(PROOF_PATH, params={"c": new_nonce()})
        assert head.status_code == 200
        assert head.content == b""


async def test_a_tunnel_url_with_a_path_is_proved_under_that_path() -> None:
    source = Source(tunnel_url=TUNNEL + "/svc")
    async with client_of(app_with(source)) as client:
        nonce = new_nonce()
        answer = await client.get("/svc" + PROOF_PATH, params={"c": nonce})
        assert answer.status_code == 200, answer.text
        assert judged(source, nonce, answer) is Outcome.PROVED


# The local proxy of `rma worker --cloudflared`.


@pytest.fixture
async def service() -> AsyncIterator[str]:
    """The volunteer's service, which knows nothing of proofs: echoes what reached it."""

    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse(
            {"path": request.url.path, "query": request.url.query, "body": body.decode()},
            headers={"x-service": "yes"},
        )

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST", "PUT"])])
    async with serve(app) as url:
        yield url


@pytest.fixture
async def strict_router() -> AsyncIterator[str]:
    """A router that routes to proved workers only."""
    async with loopback_router(tunnel_proof="require") as url:
        yield url


async def test_a_cloudflared_worker_proves_its_tunnel_through_the_local_proxy(
    tmp_path: Path, strict_router: str, service: str
) -> None:
    config = WorkerConfig(
        services=("ocr",),
        tunnel_url="",
        cloudflared=True,
        service_url=service,
        cloudflared_bin=fake_cloudflared(tmp_path),
        state_file=tmp_path / "worker.json",
        edge_url=strict_router,
        dht=TEST_SETTINGS,
        policy=LOOPBACK,
        heartbeat=1.0,
        ttl=3.0,
    )
    agent = WorkerAgent(config)
    async with agent, httpx.AsyncClient(trust_env=False, timeout=10) as client:
        assert agent.proof_proxy is not None
        assert agent.proof_proxy.url is not None
        # cloudflared forwards to the proxy, on loopback only: no port opened to the world.
        assert agent.proof_proxy.url.startswith("http://127.0.0.1:")
        assert agent.tunnel is not None
        assert agent.tunnel.service_url == agent.proof_proxy.url

        # Through the tunnel: the proof answered with the agent's key...
        nonce = new_nonce()
        proof = await client.get(f"{agent.tunnel_url}{PROOF_PATH}", params={"c": nonce})
        assert proof.status_code == 200, proof.text
        assert agent.identity is not None
        assert (
            check_proof(
                worker_id=agent.worker_id,
                public_key=agent.identity.public_key.hex(),
                tunnel_url=agent.tunnel_url,
                nonce=nonce,
                answer=proof.json(),
            ).outcome
            is Outcome.PROVED
        )
        # ... and everything else forwarded to the service, body, query and headers.
        sent = await client.put(f"{agent.tunnel_url}/a/b", params={"q": "1"}, content=b"x" * 70000)
        assert sent.status_code == 200
        assert sent.headers["x-service"] == "yes"
        assert json.loads(sent.text) == {"path": "/a/b", "query": "q=1", "body": "x" * 70000}

        # The router requires the proof: it routes once it has proved the tunnel.
        async def routed() -> bool:
            answer = await client.post(f"{strict_router}/route/ocr/job", content=b"page")
            return answer.status_code == 200

        await wait_for(routed, timeout=20, message="routed after the proof")
        answer = await client.post(f"{strict_router}/route/ocr/job", content=b"page")
        assert answer.json() == {"path": "/job", "query": "", "body": "page"}
        assert answer.headers["x-rma-worker"] == agent.worker_id


async def test_the_local_proxy_answers_502_when_the_service_is_down() -> None:
    with refusing_port() as sock:
        proxy = ProofProxy(url_of(sock), Source())
        url = await proxy.start()
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                down = await client.get(f"{url}/job")
                assert down.status_code == 502
                assert down.json()["error"] == "bad_gateway"
                # The proof is still answered: it is the agent's, not the service's.
                proof = await client.get(f"{url}{PROOF_PATH}", params={"c": new_nonce()})
                assert proof.status_code == 200
        finally:
            await proxy.aclose()


async def test_the_local_proxy_adds_no_nagle_delay(service: str) -> None:
    # Without TCP_NODELAY on its accepted connections every answer waited ~40 ms (Nagle
    # against the client's delayed ACK); the proxy sits in front of every request a worker
    # serves through its tunnel.
    proxy = ProofProxy(service, Source())
    url = await proxy.start()
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            await client.get(f"{url}/warm")
            took = []
            for _ in range(21):
                started = time.perf_counter()
                answer = await client.get(f"{url}/x")
                took.append(time.perf_counter() - started)
                assert answer.status_code == 200
    finally:
        await proxy.aclose()
    assert statistics.median(took) < 0.025, f"median {statistics.median(took) * 1e3:.1f} ms"
