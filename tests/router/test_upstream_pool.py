"""The proxy's connections to tunnels: kept alive and reused per origin, bounded in all and per
origin, and a request that finds every connection busy waits (up to the pool timeout) instead
of opening one more."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge_router.upstream.pool import TunnelTransport, per_origin_limit
from edge_router.upstream.proxy import ProxySettings, upstream_client
from tests.support.helpers import wait_for
from tests.support.upstreams import serve


class Peers:
    """The client ports an upstream saw, and a gate that holds its answers."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0

    def app(self) -> Starlette:
        async def answer(request: Request) -> Response:
            assert request.client is not None
            self.ports.add(request.client.port)
            self.held += 1
            await self.gate.wait()
            self.held -= 1
            return Response(b"x" * 1024)

        return Starlette(routes=[Route("/{path:path}", answer)])


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, Peers]]:
    peers = Peers()
    async with serve(peers.app()) as url:
        yield url, peers


async def test_sequential_requests_share_one_kept_alive_connection(
    upstream: tuple[str, Peers],
) -> None:
    url, peers = upstream
    async with upstream_client(ProxySettings()) as client:
        for _ in range(50):
            answer = await client.get(url + "/a")
            assert answer.status_code == 200
            assert len(answer.content) == 1024
    assert len(peers.ports) == 1


async def test_concurrent_requests_reuse_their_connections_afterwards(
    upstream: tuple[str, Peers],
) -> None:
    url, peers = upstream
    async with upstream_client(ProxySettings()) as client:
        for _ in range(3):
            peers.gate.clear()
            calls = [asyncio.create_task(client.get(url + "/b")) for _ in range(30)]
            await wait_for(lambda: peers.held == 30, timeout=10, message="30 requests held")
            peers.gate.set()
            answers = await asyncio.gather(*calls)
            assert all(a.status_code == 200 for a in answers)
    # 30 in flight at once take 30 connections, kept for the next rounds (httpx's default pool
    # kept 20, so every round closed 10 and opened 10 more).
    assert len(peers.ports) == 30


async def test_the_pool_is_bounded_and_a_waiting_request_times_out(
    upstream: tuple[str, Peers],
) -> None:
    url, peers = upstream
    peers.gate.clear()
    transport = TunnelTransport(max_connections=2, keepalive_expiry=60.0)
    timeout = httpx.Timeout(5.0, pool=0.2)
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        busy = [asyncio.create_task(client.get(url + "/c")) for _ in range(2)]
        await wait_for(lambda: peers.held == 2, timeout=10, message="two requests held")
        with pytest.raises(httpx.PoolTimeout):
            await client.get(url + "/c")
        assert transport.pool.connections == 2
        later = asyncio.create_task(client.get(url + "/c"))
        peers.gate.set()
        answers = await asyncio.gather(*busy, later)
        assert transport.pool.connections <= 2
    assert [a.status_code for a in answers] == [200, 200, 200]


async def test_a_stalled_tunnel_holds_its_share_of_the_pool_only(
    upstream: tuple[str, Peers],
) -> None:
    """Requests to a tunnel that holds every answer take its share of the pool and then wait in
    line: another tunnel is still reached, and the line is served by the stalled tunnel's own
    connections once they come free (no new ones)."""
    stalled_url, stalled = upstream
    stalled.gate.clear()
    share = per_origin_limit(16)
    assert share == 8
    transport = TunnelTransport(max_connections=16, keepalive_expiry=60.0)
    async with (
        serve(Peers().app()) as other_url,
        httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0)) as client,
    ):
        # As many requests as the whole pool: before, they took all of it.
        held = [asyncio.create_task(client.get(stalled_url + "/e")) for _ in range(16)]
        try:
            await wait_for(lambda: stalled.held >= share, timeout=10, message="its share held")
            other = await client.get(other_url + "/f", timeout=httpx.Timeout(10.0, pool=2.0))
            assert other.status_code == 200
            assert stalled.held == share
            with pytest.raises(httpx.PoolTimeout, match=f"all {share} connections to 127"):
                await client.get(stalled_url + "/g", timeout=httpx.Timeout(10.0, pool=0.2))
        finally:
            stalled.gate.set()  # the upstream stops only once its handlers have answered
            answers = await asyncio.gather(*held)
    assert [a.status_code for a in answers] == [200] * 16
    assert len(stalled.ports) == share  # the line was handed the connections that came free


async def test_a_connection_the_tunnel_closed_while_idle_is_not_reused() -> None:
    """A server that closes each connection after one answer: every request still succeeds."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = 0
    closed = asyncio.Event()

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    server = await asyncio.start_server(one_answer, sock=listener)
    async with server, upstream_client(ProxySettings()) as client:
        for _ in range(5):
            closed.clear()
            answer = await client.get(f"http://127.0.0.1:{port}/d")
            assert answer.text == "ok"
            await closed.wait()  # the server's close is sent before the next request goes out
    assert accepted == 5
