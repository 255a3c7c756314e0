"""The proxy's lean HTTP/1.1 connection (edge_router.upstream_http11) against scripted servers:
every way an answer can be delimited, keep-alive and close, and the answers it must refuse."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from edge_router.proxy import ProxySettings, upstream_client
from edge_router.upstream_pool import TunnelTransport


class Scripted:
    """A TCP server that answers each request (head and body) with the next of `answers`; a
    None closes the connection (after the answer before it, or instead of answering)."""

    def __init__(self, *answers: bytes | None) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b""
                lowered = head.lower()
                if b"content-length:" in lowered:
                    start = lowered.index(b"content-length:") + 15
                    length = int(lowered[start : lowered.index(b"\r\n", start)])
                    body = await reader.readexactly(length)
                elif b"transfer-encoding: chunked" in lowered:
                    body = await reader.readuntil(b"0\r\n\r\n")
                self.requests.append(head + b"\r\n\r\n" + body)
                answer = self.answers.pop(0)
                if answer is None:
                    break  # closed without an answer
                writer.write(answer)
                await writer.drain()
                if self.answers and self.answers[0] is None:
                    self.answers.pop(0)
                    break  # closed after this answer
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"http://127.0.0.1:{port}"


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def test_delimited_answers_are_read_and_the_connection_is_reused() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n0\r\nt: 1\r\n\r\n"  # an extension and a trailer
    )
    informational = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK
    empty = b"HTTP/1.1 204 No Content\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    server = Scripted(OK, chunked, informational, empty, head, OK)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        assert (await client.get(url + "/a")).content == b"ok"
        answer = await client.get(url + "/b?q=1")
        assert answer.content == b"abc"
        assert (await client.get(url + "/c")).content == b"ok"
        assert (await client.get(url + "/d")).status_code == 204
        assert (await client.head(url + "/e")).headers["content-length"] == "5"
        posted = await client.post(url + "/f", content=b"body")
        assert posted.content == b"ok"
    assert server.connections == 1
    assert server.requests[1].startswith(b"GET /b?q=1 HTTP/1.1\r\n")
    assert server.requests[5].endswith(b"\r\n\r\nbody")


async def test_a_streamed_request_body_goes_out_chunked() -> None:
    server = Scripted(OK)

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"ab", b"", b"cde"):
            yield part

    async with server.running() as url, upstream_client(ProxySettings()) as client:
        assert (await client.post(url + "/up", content=parts())).content == b"ok"
    assert server.requests[0].endswith(b"\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")


async def test_close_delimited_and_closing_answers_are_not_reused() -> None:
    until_close = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    old = b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"
    server = Scripted(until_close, None, closing, None, old, None, OK)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        assert (await client.get(url + "/a")).content == b"all of it"
        assert (await client.get(url + "/b")).content == b"ok"
        assert (await client.get(url + "/c")).content == b"ok"
        assert (await client.get(url + "/d")).content == b"ok"
    assert server.connections == 4


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nbad name: 1\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\nok",
        b"HTTP/2 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok",  # then the tunnel closes
    ],
)
async def test_ambiguous_or_broken_answers_are_refused(answer: bytes) -> None:
    server = Scripted(answer, None)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url + "/a")


async def test_a_tunnel_that_closes_without_answering_and_one_that_is_slow() -> None:
    async with Scripted(None).running() as url, upstream_client(ProxySettings()) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.get(url + "/a")

    never = asyncio.Event()
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await never.wait()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = TunnelTransport(max_connections=4, keepalive_expiry=60.0)
    async with server, httpx.AsyncClient(transport=transport, timeout=0.2) as slow:
        with pytest.raises(httpx.ReadTimeout):
            await slow.get(f"http://127.0.0.1:{port}/slow")
        never.set()
        async with asyncio.timeout(5):
            await done.wait()  # the handler closed its side before the server is closed


async def test_a_refused_connection_is_a_connect_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with upstream_client(ProxySettings()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_forward_sends_straight_to_the_pool_and_not_once_closed() -> None:
    server = Scripted(b"HTTP/1.1 200 OK\r\nset-cookie: a=b\r\ncontent-length: 2\r\n\r\nok")
    async with server.running() as url:
        client = upstream_client(ProxySettings())
        async with client:
            answer = await client.forward(httpx.Request("GET", url + "/f"))
            assert answer.request.url == url + "/f"
            assert await answer.aread() == b"ok"
            await answer.aclose()
            assert not client.cookies  # the forwarding path files no cookie
        with pytest.raises(RuntimeError, match="closed"):
            await client.forward(httpx.Request("GET", url + "/g"))
