"""Real HTTP upstreams for the proxy tests: uvicorn servers in the test's loop, on OS ports."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from dht_bridge.tunnel_proof import PROOF_PATH
from tests.support.helpers import wait_for

START_TIMEOUT = 10.0
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _Server(uvicorn.Server):
    """uvicorn that leaves signal handlers alone: several run at once and would swap them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve(
    app: ASGIApp,
    *,
    sock: socket.socket | None = None,
    http: type[asyncio.Protocol] | None = None,
) -> AsyncIterator[str]:
    """Serve `app` on `sock` or on a port the OS picks; yield the base URL, stop on exit.

    `http` is the HTTP protocol class (the router's own, say); uvicorn's h11 one by default.
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        log_config=None,  # leave the test process's logging configuration alone
        access_log=False,
        lifespan="off",
        ws="none",
        http=http or "h11",
    )
    async with serve_config(config, sock=sock) as url:
        yield url


@contextlib.asynccontextmanager
async def serve_config(
    config: uvicorn.Config, *, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Serve with `config` (its app, port and protocol) until the block ends; yield the base
    URL."""
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(
        server.serve(sockets=None if sock is None else [sock]), name="uvicorn-upstream"
    )
    try:
        await wait_for(
            lambda: server.started or task.done(), timeout=START_TIMEOUT, message="uvicorn start"
        )
        if not server.started:
            await task  # raises what stopped it
            raise RuntimeError("uvicorn stopped before it started")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def refusing_port() -> Iterator[socket.socket]:
    """A loopback socket bound but not listening: connections are refused, the port stays ours."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()


def url_of(sock: socket.socket) -> str:
    """The http URL of a bound loopback socket."""
    host, port = sock.getsockname()
    return f"http://{host}:{port}"


class Upstream:
    """An upstream that answers every path with `status` and a JSON echo of the request.

    `/slow` answers only once `release` is set (it is set when the server stops). The router's
    tunnel proof fetches (`/.well-known/rma-proof`) get 404 and are not in `seen`: this
    upstream is a service that has no proof endpoint.
    """

    def __init__(
        self, name: str, *, status: int = 200, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.name = name
        self.status = status
        self.headers = list(headers)
        self.seen: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route(PROOF_PATH, self._no_proof),
                Route("/slow", self._slow),
                Route("/{path:path}", self._echo, methods=METHODS),
            ]
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve this upstream; yield its base URL."""
        async with serve(self.app) as url:
            try:
                yield url
            finally:
                self.release.set()  # uvicorn waits for handlers before it stops

    async def _echo(self, request: Request) -> Response:
        body = await request.body()
        seen = {
            "upstream": self.name,
            "method": request.method,
            "raw_path": request.scope["raw_path"].decode("latin-1"),
            "query": request.scope["query_string"].decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw],
            "body": body.decode("latin-1"),
        }
        self.seen.append(seen)
        response = JSONResponse(seen, status_code=self.status)
        # Appended raw so that repeated names (Set-Cookie) stay separate headers.
        response.raw_headers.extend(
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers
        )
        return response

    async def _no_proof(self, request: Request) -> Response:
        return JSONResponse({"error": "not_found"}, status_code=404)

    async def _slow(self, request: Request) -> Response:
        await self.release.wait()
        return JSONResponse({"upstream": self.name, "slow": True})


def header_names(seen: dict[str, Any]) -> set[str]:
    """The header names an upstream saw on one request."""
    return {name for name, _ in seen["headers"]}


def header(seen: dict[str, Any], name: str) -> str | None:
    """The value of one header an upstream saw (the last, if repeated)."""
    values = [v for k, v in seen["headers"] if k == name]
    return values[-1] if values else None


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
