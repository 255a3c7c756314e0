"""`rma worker --cloudflared`: the quick tunnel's URL read from cloudflared's log, published,
and republished when cloudflared dies and comes back with another URL (a stand-in for the real
binary, tests/support/cloudflared_standin.py, printing the real one's lines)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from edge_router.config import CacheSettings
from tests.support.dht import TEST_SETTINGS
from tests.support.helpers import wait_for
from tests.support.router import LOOPBACK, loopback_router
from tests.support.upstreams import serve
from worker.agent import WorkerAgent
from worker.cloudflared import parse_quick_url
from worker.config import WorkerConfig
from worker.errors import TunnelError

STANDIN = Path(__file__).resolve().parents[1] / "support" / "cloudflared_standin.py"
HEARTBEAT = 1.0


def fake_cloudflared(tmp_path: Path, *extra: str) -> str:
    """An executable named cloudflared that runs the stand-in."""
    path = tmp_path / "cloudflared"
    args = " ".join(extra)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@" {args}\n')
    path.chmod(0o755)
    return str(path)


def test_the_url_is_read_from_cloudflareds_box() -> None:
    lines = [
        "2026-12-03T10:00:00Z INF Requesting new quick Tunnel on trycloudflare.com...",
        "2026-12-03T10:00:01Z INF +---------------------------------------------------+",
        "2026-12-03T10:00:01Z INF |  Your quick Tunnel has been created! Visit it at (it may "
        "take some time to be reachable):  |",
        "2026-12-03T10:00:01Z INF |  https://blue-fox-12.trycloudflare.com              |",
        "2026-12-03T10:00:01Z INF +---------------------------------------------------+",
    ]
    assert parse_quick_url(lines) == "https://blue-fox-12.trycloudflare.com"
    assert parse_quick_url(lines[:3]) is None  # the box is not complete yet
    assert parse_quick_url(["|  https://evil.example  |"]) is None  # not after the banner


@pytest.fixture
async def service() -> AsyncIterator[str]:
    """The worker's own service: answers which URL it was reached under."""

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"hello from {request.url.path}")

    app = Starlette(routes=[Route("/{path:path}", hello)])
    async with serve(app) as url:
        yield url


@pytest.fixture
async def router() -> AsyncIterator[str]:
    """A router whose cache lasts a fraction of a heartbeat (what a move is measured against)."""
    async with loopback_router(cache=CacheSettings(ttl=0.2)) as url:
        yield url


def config(tmp_path: Path, router: str, service: str, binary: str) -> WorkerConfig:
    return WorkerConfig(
        services=("ocr",),
        tunnel_url="",
        cloudflared=True,
        service_url=service,
        cloudflared_bin=binary,
        state_file=tmp_path / "worker.json",
        edge_url=router,
        dht=TEST_SETTINGS,
        policy=LOOPBACK,
        heartbeat=HEARTBEAT,
        ttl=3 * HEARTBEAT,
    )


async def listed(client: httpx.AsyncClient, router: str) -> list[str]:
    answer = await client.get(f"{router}/services/ocr", params={"region": "x"})
    assert answer.status_code == 200, answer.text
    return [p["tunnel_url"] for p in answer.json()["providers"]]


async def test_a_worker_with_cloudflared_is_routable_and_follows_a_new_tunnel_url(
    tmp_path: Path, router: str, service: str
) -> None:
    agent = WorkerAgent(config(tmp_path, router, service, fake_cloudflared(tmp_path)))
    async with agent, httpx.AsyncClient(trust_env=False, timeout=10) as client:
        first = agent.tunnel_url
        assert first.startswith("http://127.0.0.1:")
        await wait_for(
            lambda: _has(client, router, first), timeout=20, message="the first URL listed"
        )
        routed = await client.get(f"{router}/route/ocr/job")
        assert routed.status_code == 200, routed.text
        assert routed.text == "hello from /job"

        assert agent.tunnel is not None
        assert agent.tunnel.process is not None
        os.kill(agent.tunnel.process.pid, signal.SIGKILL)
        await wait_for(
            lambda: agent.tunnel_url != first, timeout=15, message="cloudflared restarted"
        )
        second = agent.tunnel_url
        learnt = time.monotonic()

        async def moved() -> bool:
            urls = await listed(client, router)
            return urls == [second]

        await wait_for(moved, timeout=15, message="the new URL, and only it, listed")
        # Republished at once, not at the next beat: well within one heartbeat.
        assert time.monotonic() - learnt < HEARTBEAT
        routed = await client.get(f"{router}/route/ocr/again")
        assert routed.status_code == 200, routed.text
        assert agent.tunnel.restarts == 1
    # The agent stops cloudflared when it stops.
    assert agent.tunnel.process is None


async def _has(client: httpx.AsyncClient, router: str, url: str) -> bool:
    return url in await listed(client, router)


async def test_cloudflared_that_gives_no_url_stops_the_start(
    tmp_path: Path, router: str, service: str
) -> None:
    agent = WorkerAgent(config(tmp_path, router, service, fake_cloudflared(tmp_path, "--fail")))
    with pytest.raises(TunnelError, match="failed to request quick Tunnel"):
        await agent.start()


async def test_a_missing_cloudflared_is_a_clear_start_error(
    tmp_path: Path, router: str, service: str
) -> None:
    agent = WorkerAgent(config(tmp_path, router, service, str(tmp_path / "nowhere")))
    with pytest.raises(TunnelError, match=r"cannot run .*: not found\. Install cloudflared"):
        await agent.start()
