"""The example service (examples/ocr_service.py) proves its tunnel URL with ProofMiddleware, so
a router in `RMA_TUNNEL_PROOF=require` mode routes to it (issue 20)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dht_bridge.tunnel_proof import PROOF_PATH, Outcome, check_proof, new_nonce
from examples.ocr_service import create_app as create_example
from tests.support.dht import TEST_SETTINGS
from tests.support.helpers import wait_for
from tests.support.router import LOOPBACK, loopback_router
from tests.support.upstreams import serve, url_of
from worker import WorkerAgent, WorkerConfig


@pytest.fixture
async def strict_router() -> AsyncIterator[str]:
    """A router on a real port that routes to proved workers only."""
    async with loopback_router(tunnel_proof="require") as url:
        yield url


async def test_the_example_service_is_routed_by_a_router_that_requires_the_proof(
    strict_router: str, tmp_path: Path
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    tunnel = url_of(sock)
    config = WorkerConfig(
        services=("ocr",),
        tunnel_url=tunnel,
        state_file=tmp_path / "worker.json",
        edge_url=strict_router,
        dht=TEST_SETTINGS,
        policy=LOOPBACK,
        heartbeat=1.0,
        ttl=3.0,
    )
    app = create_example(config)
    async with (
        app.router.lifespan_context(app),
        serve(app, sock=sock),
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
    ):
        agent: WorkerAgent = app.state.agent
        assert agent.identity is not None
        nonce = new_nonce()
        proof = await client.get(f"{tunnel}{PROOF_PATH}", params={"c": nonce})
        assert proof.status_code == 200, proof.text
        verdict = check_proof(
            worker_id=agent.worker_id,
            public_key=agent.identity.public_key.hex(),
            tunnel_url=tunnel,
            nonce=nonce,
            answer=proof.json(),
        )
        assert verdict.outcome is Outcome.PROVED

        async def routed() -> bool:
            answer = await client.post(f"{strict_router}/route/ocr/ocr", content=b"one\ntwo")
            return answer.status_code == 200

        await wait_for(routed, timeout=20, message="routed once proved")
        answer = await client.post(f"{strict_router}/route/ocr/ocr", content=b"one\ntwo")
        assert answer.json()["lines"] == 2
        assert answer.headers["x-rma-worker"] == agent.worker_id
