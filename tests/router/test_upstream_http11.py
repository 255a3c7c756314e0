"""The proxy's lean HTTP/1.1 connection (edge_router.upstream.http11) against scripted servers:
every way an answer can be delimited, keep-alive and close, and the answers it must refuse."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge_router.upstream.http11 import MAX_HEAD_BYTES, LeanHTTP11Connection
from edge_router.upstream.pool import TunnelTransport
from edge_router.upstream.proxy import ProxySettings, upstream_client
from tests.support.upstreams import Scripted, serve_config

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
PIECE_SIZE = 512 * 1024


async def test_delimited_answers_are_read_and_the_connection_is_reused() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n0\r\nt: 1\r\n\r\n"  # an extension and a trailer
    )
    informational = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK
    empty = b"HTTP/1.1 204 No Content\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    # Whitespace around a field value is not part of it (RFC 9110 section 5.5); llhttp keeps
    # what trails it. Spaces after a chunk size (BWS before an extension in RFC 9112 section
    # 7.1.1, and at the end of the line, as h11 takes it) are read too.
    spaced = (
        b"HTTP/1.1 200 Fine \xe9\r\nx-a: \t a b \t\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3 ;x=y\r\nabc\r\n2\t\r\nde\r\n0 \r\n\r\n"
    )
    server = Scripted(OK, chunked, informational, empty, head, OK, spaced)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        first = await client.get(url + "/a")
        assert (first.content, first.reason_phrase) == (b"ok", "OK")
        answer = await client.get(url + "/b?q=1")
        assert (answer.content, "t" in answer.headers) == (b"abc", False)
        after_hints = await client.get(url + "/c")  # the 103's head is not the answer's
        assert (after_hints.content, after_hints.reason_phrase) == (b"ok", "OK")
        assert list(after_hints.headers) == ["content-length"]
        assert (await client.get(url + "/d")).status_code == 204
        assert (await client.head(url + "/e")).headers["content-length"] == "5"
        posted = await client.post(url + "/f", content=b"body")
        assert posted.content == b"ok"
        odd = await client.get(url + "/g")
        assert (odd.content, odd.headers.raw[0]) == (b"abcde", (b"x-a", b"a b"))
        assert odd.extensions["reason_phrase"] == b"Fine \xe9"
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
    ("answer", "body", "connections"),
    [
        # HTTP/1.0 is never kept alive, "connection: keep-alive" or not (as h11 does; llhttp
        # would keep it).
        (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok", b"ok", 2),
        # Bytes after the answer that nobody asked for: the connection is not used again.
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokX", b"ok", 2),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", b"", 2),
        # Empty lines right after an answer are skipped by llhttp, as between messages; they
        # carry nothing, so the connection stays in use (the regex parser closed it).
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\r\n", b"ok", 1),
    ],
)
async def test_keep_alive_decisions(answer: bytes, body: bytes, connections: int) -> None:
    server = Scripted(answer, OK)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        assert (await client.get(url + "/a")).content == body
        assert (await client.get(url + "/b")).content == b"ok"
    assert server.connections == connections


async def test_answers_to_head_have_no_body() -> None:
    # A body sent anyway stays unread and the connection is not used again; an answer to HEAD
    # that declares no length is closed too (llhttp's keep-alive rule: such an answer would
    # end with the connection; the regex parser kept it).
    with_body = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
    no_length = b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\n"
    # The transfer codings a GET would get: not checked, as no body follows.
    codings = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
    server = Scripted(with_body, OK, no_length, OK, codings, OK)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        first = await client.head(url + "/a")
        assert (first.status_code, first.content) == (200, b"")
        assert (await client.get(url + "/b")).content == b"ok"
        second = await client.head(url + "/c")
        assert (second.headers["x-a"], second.content) == ("1", b"")
        assert (await client.get(url + "/d")).content == b"ok"
        assert (await client.head(url + "/e")).status_code == 200
        assert (await client.get(url + "/f")).content == b"ok"
    assert server.connections == 3


async def test_trace_events_are_httpcores() -> None:
    events: list[str] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        events.append(event)

    async with Scripted(OK, OK).running() as url, upstream_client(ProxySettings()) as client:
        for path in ("/a", "/b"):
            answer = await client.get(url + path, extensions={"trace": trace})
            assert answer.content == b"ok"
    assert events == [
        "connection.connect_tcp.started",
        "connection.connect_tcp.complete",
        "http11.receive_response_headers.complete",
        "http11.receive_response_headers.complete",
    ]


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
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok",  # and here
        b"HTTP/1.1 200 OK\r\nx-a: 1\rcontent-length: 2\r\n\r\nok",  # bare CR
        b"HTTP/1.1 200 OK\r\nx-a : 1\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nx-a: a\x7fb\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 20 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n",
        # llhttp takes these; the module's own checks refuse them, as h11 does.
        b"HTTP/2.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/0.9 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 O\x01K\r\ncontent-length: 2\r\n\r\nok",  # control byte in the reason
        b"HTTP/1.1 200 O\x00K\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked;q=1\r\n\r\n0\r\n\r\n",
        # Refused since llhttp parses answers (the regex parser took them): a repeated
        # Content-Length even when equal, a status below 100, a chunk extension or a trailer
        # outside RFC 9112's grammar.
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n" + OK,
        # No HTTP status is over 599 (RFC 9110 section 15); llhttp takes any three digits.
        b"HTTP/1.1 600 Odd\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 999 Whatever\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;x=a b\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nbad trailer\r\n\r\n",
    ],
)
async def test_ambiguous_or_broken_answers_are_refused(answer: bytes) -> None:
    server = Scripted(answer, None)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url + "/a")


async def endless(writer: asyncio.StreamWriter, start: bytes, filler: bytes) -> None:
    """Write `start`, then `filler` over and over (up to 4 MiB) while the reader takes it."""
    with contextlib.suppress(ConnectionError):
        writer.write(start)
        for _ in range(4 * 2**20 // len(filler)):
            writer.write(filler)
            await writer.drain()
    writer.close()


@pytest.mark.parametrize(
    ("start", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nx-a: ", "head is too long"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=", "too long"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nt: ", "too long"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nt", "too long"),
    ],
)
async def test_endless_heads_chunk_lines_and_trailers_are_refused(start: bytes, match: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await endless(writer, start, b"a" * 1024)

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, upstream_client(ProxySettings()) as client:
        with pytest.raises(httpx.RemoteProtocolError, match=match):
            await client.get(f"http://127.0.0.1:{port}/a")


async def test_a_head_up_to_the_limit_is_read() -> None:
    filler = b"x-a: " + b"a" * 1000 + b"\r\n"
    count = (MAX_HEAD_BYTES - 100) // len(filler)
    big = b"HTTP/1.1 200 OK\r\n" + filler * count + b"content-length: 2\r\n\r\nok"
    too_big = b"HTTP/1.1 200 OK\r\n" + filler * (count + 2) + b"content-length: 2\r\n\r\nok"
    server = Scripted(big, too_big)
    async with server.running() as url, upstream_client(ProxySettings()) as client:
        answer = await client.get(url + "/a")
        assert (answer.content, len(answer.headers.get_list("x-a"))) == (b"ok", count)
        with pytest.raises(httpx.RemoteProtocolError, match="head is too long"):
            await client.get(url + "/b")


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


@pytest.mark.parametrize(
    ("first", "drip"),
    [
        (b"HTTP/1.1 200 OK\r\n", b"x-a: b\r\n"),  # one header line at a time
        (b"", b"HTTP/1.1 103 Early Hints\r\n\r\n"),  # one interim answer at a time
    ],
    ids=["header-lines", "interim-answers"],
)
async def test_a_head_dripped_in_pieces_times_out_once_for_the_whole_head(
    first: bytes, drip: bytes
) -> None:
    """The read timeout bounds the whole head: a piece arriving within it each time does not
    start it again (a tunnel could hold a connection of the pool forever)."""

    done = asyncio.Event()

    async def dripping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(first)
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof():  # until the client gives up and closes
                writer.write(drip)
                await writer.drain()
                await asyncio.sleep(0.05)  # the hostile tunnel's pace, well inside the timeout
        writer.close()
        done.set()

    server = await asyncio.start_server(dripping, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = TunnelTransport(max_connections=4, keepalive_expiry=60.0)
    async with server, httpx.AsyncClient(transport=transport, timeout=0.5) as client:
        async with asyncio.timeout(10):  # far beyond the read timeout on a loaded machine
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"http://127.0.0.1:{port}/drip")
            await done.wait()  # the handler saw the close and closed its side


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


TOO_LARGE = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 4\r\n\r\nbig!"
BIG = 32 * 1024 * 1024  # beyond what loopback's socket buffers take while nobody reads


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
if sys.platform != "win32":
    import uvloop

    LOOPS["uvloop"] = uvloop.new_event_loop


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("then", ["close", "hold"])
@pytest.mark.parametrize("streamed", [False, True], ids=["bytes", "stream"])
def test_an_answer_before_the_whole_body_is_the_exchanges_answer(
    loop: str, then: str, streamed: bool
) -> None:
    """RFC 9112 section 9.5: a tunnel that refuses a body it has not read (a 413) and closes,
    which makes the kernel reset the connection under our writes, or keeps the connection
    without reading: its answer is passed on, not a broken pipe or a write timeout, and the
    connection, whose request was cut short, is not used again. On uvloop, the router's loop,
    a failed write closes the transport before the answer is read (see `_Wire._rescue`)."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(answer_before_the_whole_body(then, streamed))


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_early_answer_after_100_continue_is_the_exchanges_answer(loop: str) -> None:
    """The same with a 100 Continue in front of the 413 (legal, even unasked): the interim
    answer does not hide the final one when the tunnel resets the connection."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(answer_before_the_whole_body("close", True, interim=CONTINUE))


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def answer_before_the_whole_body(then: str, streamed: bool, *, interim: bytes = b"") -> None:
    """One case of the tests above; `interim` goes before the 413."""
    release = asyncio.Event()
    connections = 0

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        if b"content-length: 2\r\n" in head.lower():  # the small request after
            await reader.readexactly(2)
            writer.write(OK)
        else:
            writer.write(interim + TOO_LARGE)
        await writer.drain()
        if then == "hold":
            await release.wait()
        writer.close()  # with the body unread: a reset

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(BIG // PIECE_SIZE):
            yield b"x" * PIECE_SIZE

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # A write timeout far beyond the test's: a client waiting for the kernel to take the body
    # would fail the test by its timeout, not pass by luck.
    settings = ProxySettings(write_timeout=120.0)
    async with server, upstream_client(settings) as client:
        body: bytes | AsyncIterator[bytes] = pieces() if streamed else b"x" * BIG
        async with asyncio.timeout(60):
            refused = await client.post(url + "/upload", content=body)
        assert (refused.status_code, refused.content) == (413, b"big!")
        assert (await client.post(url + "/small", content=b"ok")).content == b"ok"
        release.set()
    assert connections == 2  # the cut-short connection was not reused


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_an_answer_still_unread_when_the_reset_fails_a_write_is_read(loop: str) -> None:
    """The tunnel answers and resets the connection before the event loop has read the answer:
    the next write fails and the transport closes at once, yet the answer is in the kernel's
    receive queue and is what the client gets."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(answer_unread_at_the_reset())


async def answer_unread_at_the_reset() -> None:
    """The test above; the tunnel is a thread with a blocking socket, so that the client's loop
    can be kept from reading while the tunnel answers and closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed = threading.Event()

    def tunnel() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(TOO_LARGE)
        closed.set()  # closed with the body unread: the kernel resets the connection

    thread = threading.Thread(target=tunnel, daemon=True)
    thread.start()

    async def pieces() -> AsyncIterator[bytes]:
        yield b"x" * PIECE_SIZE
        # Blocks the loop on purpose: nothing is read until the writes below have failed.
        assert closed.wait(timeout=30)
        for _ in range(8):
            yield b"x" * PIECE_SIZE

    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        async with upstream_client(ProxySettings(write_timeout=30.0)) as client:
            refused = await client.post(url + "/upload", content=pieces())
        assert (refused.status_code, refused.content) == (413, b"big!")
    finally:
        listener.close()
        thread.join(timeout=30)


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tunnel.pem", directory / "tunnel.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_over_tls_answers_are_read_connections_reused_and_an_early_413_passed_on(
    tmp_path: Path,
) -> None:
    """Every tunnel in production is https: the same exchanges over TLS (uvicorn with a
    certificate of ours), including a service refusing an upload it has not read."""
    cert, key = tls_files(tmp_path)

    async def answer(request: Request) -> Response:
        if int(request.headers.get("content-length", "0")) > 1024:
            return Response(b"too large", status_code=413)
        return Response(b"took " + str(len(await request.body())).encode())

    app = Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        log_config=None,
        lifespan="off",
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    trusted = ssl.create_default_context(cafile=str(cert))
    transport = TunnelTransport(max_connections=4, keepalive_expiry=60.0, ssl_context=trusted)
    async with serve_config(config) as url, httpx.AsyncClient(transport=transport) as client:
        base = url.replace("http://", "https://")
        for n in range(5):
            got = await client.post(base + "/small", content=b"x" * n)
            assert (got.status_code, got.content) == (200, b"took %d" % n)
        assert transport.pool.connections == 1  # one TLS handshake for the five
        refused = await client.post(base + "/pages", content=b"u" * (16 * 1024 * 1024))
        assert (refused.status_code, refused.content) == (413, b"too large")
        after = await client.post(base + "/small", content=b"ok")
        assert after.content == b"took 2"


async def test_a_connections_socket_is_closed_when_its_aclose_returns() -> None:
    """A transport closes its socket a loop turn after `close()`: a connection's `aclose` waits
    for that, or a loop stopped just after (a shutdown, a test's runner) leaves the socket open
    and warns of it when the transport is collected."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        origin = httpcore.Origin(b"http", b"127.0.0.1", port)
        connection = LeanHTTP11Connection(origin, ssl_context=None, keepalive_expiry=5.0)
        request = httpcore.Request(
            "GET", f"http://127.0.0.1:{port}/", headers=[(b"host", b"127.0.0.1")]
        )
        response = await connection.handle_async_request(request)
        assert await response.aread() == b"ok"
        await response.aclose()
        wire = connection._wire
        assert wire is not None
        assert wire.transport is not None
        sock = wire.transport.get_extra_info("socket")
        await connection.aclose()
        assert sock.fileno() == -1  # closed, not only closing
    finally:
        server.close()
        await server.wait_closed()
