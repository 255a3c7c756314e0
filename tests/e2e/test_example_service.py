"""The example service (examples/ocr_service.py) with its embedded agent, answering through
the router's /route, its load counted in flight, its services changed while it runs; and the
thread-backed agent for programs that are not async."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from dht_bridge.errors import ConfigError
from examples.ocr_service import create_app as create_example
from tests.support.dht import TEST_SETTINGS
from tests.support.helpers import wait_for
from tests.support.router import LOOPBACK, loopback_router
from tests.support.upstreams import serve, url_of
from worker import BackgroundAgent, InFlightCounter, InFlightMiddleware, WorkerConfig


@pytest.fixture
async def router() -> AsyncIterator[str]:
    """A router on a real port admitting loopback tunnels."""
    async with loopback_router() as url:
        yield url


def worker_config(tmp_path: Path, tunnel: str, router: str) -> WorkerConfig:
    return WorkerConfig(
        services=("ocr",),
        tunnel_url=tunnel,
        state_file=tmp_path / "worker.json",
        edge_url=router,
        dht=TEST_SETTINGS,
        policy=LOOPBACK,
        heartbeat=1.0,
        ttl=3.0,
    )


async def providers(client: httpx.AsyncClient, router: str, service: str) -> list[str]:
    # ?region= makes each read a cache miss: what the backends know now.
    answer = await client.get(f"{router}/services/{service}", params={"region": "x"})
    assert answer.status_code == 200, answer.text
    return [p["tunnel_url"] for p in answer.json()["providers"]]


async def test_the_example_service_answers_through_the_router(router: str, tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    tunnel = url_of(sock)
    app = create_example(worker_config(tmp_path, tunnel, router))
    async with (
        app.router.lifespan_context(app),
        serve(app, sock=sock),
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
    ):

        async def listed(service: str) -> bool:
            return tunnel in await providers(client, router, service)

        await wait_for(lambda: listed("ocr"), timeout=20, message="the example listed")
        routed = await client.post(f"{router}/route/ocr/ocr", content=b"line one\nline two")
        assert routed.status_code == 200, routed.text
        assert routed.json()["lines"] == 2
        assert routed.json()["worker"] == app.state.agent.worker_id

        # Services change while it runs: republished at once, found under the new name.
        changed = await client.post(f"{tunnel}/admin/services", json={"services": ["ocr", "hw"]})
        assert changed.json() == {"services": ["ocr", "hw"]}
        await wait_for(lambda: listed("hw"), timeout=10, message="the new service")


async def test_the_middleware_reports_requests_in_flight_as_load(
    router: str, tmp_path: Path
) -> None:
    app = create_example(worker_config(tmp_path, "http://127.0.0.1:9", router))
    async with app.router.lifespan_context(app):
        agent = app.state.agent
        # The example counts its requests into the very source its agent reads the load from.
        counter = app.user_middleware[0].kwargs["counter"]
        assert isinstance(counter, InFlightCounter)
        assert agent.load is counter
        # A measured load cannot be set by hand; a bad service name changes nothing.
        with pytest.raises(ConfigError, match="InFlightCounter"):
            await agent.update(load=0.3)
        with pytest.raises(ConfigError, match="does not match"):
            await agent.update(services=["Not A Name"])
        assert agent.config.services == ("ocr",)
        gate = asyncio.Event()

        async def held(scope: Scope, receive: Receive, send: Send) -> None:
            await gate.wait()

        counting = InFlightMiddleware(held, counter=counter)
        requests = [asyncio.ensure_future(counting({"type": "http"}, _nothing, _drop))]
        requests.append(asyncio.ensure_future(counting({"type": "http"}, _nothing, _drop)))
        await wait_for(lambda: counter.in_flight == 2, timeout=5, message="two in flight")
        assert await agent.load() == 0.5  # 2 of the example's capacity of 4
        # Other ASGI traffic (the lifespan, websockets) is not work.
        await InFlightMiddleware(_answer, counter=counter)({"type": "lifespan"}, _nothing, _drop)
        assert counter.in_flight == 2
        gate.set()
        await asyncio.gather(*requests)
        assert await agent.load() == 0.0


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


async def _drop(message: Message) -> None:
    return None


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    return None


async def test_the_background_agent_serves_a_program_that_is_not_async(
    router: str, tmp_path: Path
) -> None:
    config = worker_config(tmp_path, "http://127.0.0.1:9", router)

    def program() -> tuple[str, str, list[str], str]:
        """What a program that is not async does; it runs on a thread of its own here, as
        the router it talks to runs on this test's loop."""
        with BackgroundAgent(config) as agent:
            mode = agent.mode.value
            agent.update(load=0.5)
            found = [p.worker_id for p in agent.discover("ocr").providers]
        return agent.worker_id, mode, found, agent.mode.value

    worker_id, mode, found, after = await asyncio.to_thread(program)
    assert mode == "dht"
    assert worker_id in found
    assert after == "stopped"
