"""The worker's side of the tunnel proof (see dht_bridge.tunnel_proof): answer the router's
challenge at `{tunnel_url}/.well-known/rma-proof` with the agent's key, through the tunnel.

- `ProofMiddleware` for a service that embeds the agent: it answers the proof path itself and
  passes every other request to the service.
- `ProofProxy` for `rma worker --cloudflared`: a small reverse proxy on a loopback port that
  cloudflared points at; it answers the proof path and forwards the rest to the service. The
  volunteer opens no port: cloudflared dials out, the proxy listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import httpx
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dht_bridge.errors import RecordError
from dht_bridge.httpwire import end_to_end
from dht_bridge.identity import Identity
from dht_bridge.tunnel_proof import NONCE_PARAM, NONCE_RE, PROOF_PATH, sign_proof
from dht_bridge.tunnels import canonical_tunnel_url

__all__ = ["ProofMiddleware", "ProofProxy", "ProofSource", "proof_answer"]

logger = logging.getLogger(__name__)

# The proxy's own server stamps these.
_RESPONSE_DROP = frozenset({b"date", b"server"})
START_TIMEOUT = 10.0
# Open requests get this long to finish when the agent stops.
STOP_TIMEOUT = 3
# The service's own work may be long: the router bounds a routed request's wait, not us.
SERVICE_CONNECT_TIMEOUT = 5.0


class ProofSource(Protocol):
    """What answers a proof: the running agent's key and the tunnel URL its record names."""

    @property
    def identity(self) -> Identity | None:
        """The worker's key; None before the agent has started."""
        ...

    @property
    def tunnel_url(self) -> str:
        """The tunnel URL the worker's record names."""
        ...


def proof_answer(source: ProofSource | None, query: bytes) -> tuple[int, dict[str, str]]:
    """The status and JSON body answering a proof request with query string `query`."""
    if source is None or source.identity is None:
        return 503, {"error": "unavailable", "detail": "the worker agent has not started"}
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get(NONCE_PARAM, [])
    if len(values) != 1 or not NONCE_RE.fullmatch(values[0]):
        return 400, {"error": "bad_request", "detail": f"one nonce {NONCE_PARAM}= is required"}
    try:
        return 200, sign_proof(source.identity, source.tunnel_url, values[0])
    except RecordError as exc:  # a URL with no canonical form: the record was refused too
        return 503, {"error": "unavailable", "detail": str(exc)}


class ProofMiddleware:
    """Pure ASGI middleware answering `GET /.well-known/rma-proof` for the agent `agent()`
    returns (None until it has started); every other request goes to `app` untouched.

    `Starlette(middleware=[Middleware(ProofMiddleware, agent=lambda: ...)])`.
    """

    def __init__(self, app: ASGIApp, *, agent: Callable[[], ProofSource | None]) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the proof path; pass anything else through."""
        if scope["type"] != "http" or not self._is_proof_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            status, body = 405, {"error": "method_not_allowed", "detail": "GET only"}
        else:
            status, body = proof_answer(self.agent(), scope.get("query_string", b""))
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode("ascii")),
            # Every answer is for one nonce: a cache in between must not replay it.
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        body_bytes = b"" if scope["method"] == "HEAD" else payload
        await send({"type": "http.response.body", "body": body_bytes})

    def _is_proof_path(self, path: str) -> bool:
        if path == PROOF_PATH:
            return True
        if not path.endswith(PROOF_PATH):
            return False
        # A tunnel URL with a path (https://host/svc) is asked at /svc/.well-known/rma-proof.
        source = self.agent()
        if source is None:
            return False
        with contextlib.suppress(RecordError):
            prefix = urlsplit(canonical_tunnel_url(source.tunnel_url)).path.rstrip("/")
            return bool(prefix) and path == prefix + PROOF_PATH
        return False


class _Forward:
    """An ASGI app forwarding each HTTP request to `service_url`, streamed both ways."""

    def __init__(self, service_url: str, client: httpx.AsyncClient) -> None:
        self.base = httpx.URL(service_url)
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # uvicorn runs with lifespan and websockets off: nothing else arrives
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = scope.get("query_string", b"")
        prefix = self.base.raw_path.split(b"?", 1)[0].rstrip(b"/")
        target = self.base.copy_with(raw_path=prefix + raw + (b"?" + query if query else b""))
        headers = end_to_end(scope["headers"])
        has_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        request = httpx.Request(
            scope["method"],
            target,
            headers=headers,
            content=_body(receive) if has_body else None,
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            logger.warning("the service at %s did not answer: %s", self.base, exc)
            await _send_error(send, 502, f"the worker's service did not answer: {exc}")
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": end_to_end(response.headers.raw, _RESPONSE_DROP),
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _send_error(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"error": "bad_gateway", "detail": detail}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode("ascii")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _Server(uvicorn.Server):
    """uvicorn that leaves the process's signal handlers to the agent, and says when it
    listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The agent's own SIGTERM handling stays in place."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening, then say so."""
        await super().startup(sockets=sockets)
        self.ready.set()


class ProofProxy:
    """A reverse proxy on 127.0.0.1 (a port from the OS) in front of `service_url`: answers
    the tunnel proof for `agent` and forwards everything else. Point cloudflared at `url`.

    HTTP only: WebSocket upgrades are not forwarded.
    """

    def __init__(
        self,
        service_url: str,
        agent: ProofSource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.service_url = service_url
        self.url: str | None = None
        self._agent = agent
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Listen on a loopback port; return the URL cloudflared should forward to."""
        self._client = httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(None, connect=SERVICE_CONNECT_TIMEOUT),
            follow_redirects=False,
            trust_env=False,
        )
        agent = self._agent
        app = ProofMiddleware(_Forward(self.service_url, self._client), agent=lambda: agent)
        server = self._server = _Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                log_config=None,
                access_log=False,
                lifespan="off",
                ws="none",
                http="h11",
                timeout_graceful_shutdown=STOP_TIMEOUT,
            )
        )
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says TCP, and without it every answer waits ~40 ms (Nagle against
        # the peer's delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(
            server.serve(sockets=[sock]), name="proof-proxy"
        )
        ready = asyncio.get_running_loop().create_task(server.ready.wait())
        try:
            await asyncio.wait(
                {ready, self._task}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
        if not server.ready.is_set():
            await self.aclose()
            raise OSError(f"the proof proxy did not start within {START_TIMEOUT:g} s")
        self.url = f"http://127.0.0.1:{port}"
        logger.info("proof proxy on %s in front of %s", self.url, self.service_url)
        return self.url

    async def aclose(self) -> None:
        """Stop listening, let open requests finish, close the client."""
        if self._task is not None and self._server is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
