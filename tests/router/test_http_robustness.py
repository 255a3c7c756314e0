"""The router's HTTP under attack (issue 20, cases 6, 7 and 9), byte for byte: the real app under
a real uvicorn with the router's own protocol (edge_router.server) on a port from the OS, raw
client sockets, and raw upstreams that record every byte they receive."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from edge_router.config import PROOF_OFF, RouterConfig
from edge_router.server import (
    MAX_HEAD_BYTES,
    Deadline,
    GuardedH11Protocol,
    RefusalLog,
    ServerLimits,
    protocol_class,
    server_config,
)
from tests.support.helpers import ManualClock, make_record, wait_for
from tests.support.rawhttp import Answer, RawUpstream, hang_up, send_raw
from tests.support.redis_server import TEST_REDIS_TIMEOUT
from tests.support.router import ADMIN_TOKEN, client_for, router_app
from tests.support.upstreams import serve_config

# The tests, and only they, let tunnel URLs point at loopback.
LOOPBACK = TunnelPolicy(allow_loopback=True)
# These tests count what reaches the upstreams, and share their kept-alive connections: the
# tunnel proof's background fetches would add requests of their own (tests/router/
# test_tunnel_proof.py covers those).
ROBUSTNESS_CONFIG = RouterConfig(admin_token=ADMIN_TOKEN, policy=LOOPBACK, tunnel_proof=PROOF_OFF)
WAIT = 10.0  # deadline of every wait: generous for a loaded 2-core machine


@dataclass
class Router:
    """A router app served by uvicorn with the router's protocol."""

    app: Starlette
    port: int
    protocol: type[GuardedH11Protocol]

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def count(self, klass: str, status: int) -> int:
        """Requests of `klass` the app counted with `status`."""
        return int(self.app.state.rma.metrics.requests[(klass, status)])


@pytest.fixture
async def registry(redis_url: str) -> AsyncIterator[Registry]:
    """A registry that admits loopback tunnel URLs, on the emptied session server."""
    opened = open_registry(
        RegistrySettings(redis_url=redis_url, timeout=TEST_REDIS_TIMEOUT), policy=LOOPBACK
    )
    try:
        yield opened
    finally:
        await opened.aclose()


@contextlib.asynccontextmanager
async def running(
    registry: Registry,
    limits: ServerLimits | None = None,
    refusals: RefusalLog | None = None,
    settings: RouterConfig = ROBUSTNESS_CONFIG,
) -> AsyncIterator[Router]:
    """The router app (lifespan included) under uvicorn on an OS port, counting refusals in
    `refusals` if given, as the app's own (which /metrics exposes)."""
    app = router_app(registry, config=settings)
    if refusals is not None:
        app.state.rma.refused = refusals
    protocol = protocol_class(limits, app.state.rma.refused)
    # As `rma router` serves it (edge_router.server.server_config).
    config = server_config(app, host="127.0.0.1", port=0, lifespan="off", http=protocol)
    async with app.router.lifespan_context(app), serve_config(config) as base:
        yield Router(app, int(base.rsplit(":", 1)[1]), protocol)


async def register(registry: Registry, url: str, *, load: float = 0.0) -> WorkerRecord:
    """A provider of `ocr` at `url`, in the registry."""
    record = make_record(tunnel_url=url, load=load, services=["ocr"])
    assert await registry.upsert(record)
    return record


async def through_router(registry: Registry, *requests: bytes) -> tuple[list[Answer], RawUpstream]:
    """Each of `requests`, raw, on a new connection to a router whose one ocr provider is a raw
    upstream; their answers, and the upstream (what reached it)."""
    upstream = RawUpstream()
    async with upstream.running() as url, running(registry) as router:
        await register(registry, url)
        answers = [await send_raw(router.port, raw, timeout=WAIT) for raw in requests]
    return answers, upstream


# -- case 6: request smuggling -------------------------------------------------------------

SMUGGLED = b"GET /route/ocr/smuggled HTTP/1.1\r\nHost: router\r\n\r\n"
AMBIGUOUS = {
    # Transfer-Encoding wins in h11: a front that reads Content-Length sees a second request.
    "content-length-then-transfer-encoding": (
        b"POST /route/ocr/x HTTP/1.1\r\nHost: router\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "transfer-encoding-then-content-length": (
        b"POST /route/ocr/x HTTP/1.1\r\nHost: router\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n2f\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"
    ),
    "transfer-encoding-in-http-1.0": (
        b"POST /route/ocr/x HTTP/1.0\r\nHost: router\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    # h11 splits at a bare LF: one header line for a front that needs CRLF, two for h11.
    "bare-lf-in-a-header-line": (
        b"GET /route/ocr/x HTTP/1.1\r\nHost: router\r\nX-Note: a\nX-Admin: yes\r\n\r\n"
    ),
    "bare-lf-line-ends": b"GET /route/ocr/x HTTP/1.1\nHost: router\n\n",
    "obsolete-line-folding": (
        b"GET /route/ocr/x HTTP/1.1\r\nHost: router\r\nX-Note: a\r\n X-Admin: yes\r\n\r\n"
    ),
    "two-host-headers": b"GET /route/ocr/x HTTP/1.1\r\nHost: router\r\nHost: other\r\n\r\n",
    # Refused by h11 already; kept so that a change of parser cannot let them through.
    "bare-cr-in-a-header-line": (
        b"GET /route/ocr/x HTTP/1.1\r\nHost: router\r\nX-Note: a\rX-Admin: yes\r\n\r\n"
    ),
    "conflicting-content-lengths": (
        b"POST /route/ocr/x HTTP/1.1\r\nHost: router\r\nContent-Length: 3\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    ),
}


@pytest.mark.parametrize("raw", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
async def test_ambiguous_framing_is_refused_with_400_and_a_closed_connection(
    registry: Registry, raw: bytes
) -> None:
    # The router still serves well-framed requests, on a new connection.
    fine_request = b"GET /route/ocr/fine HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n"
    (answer, fine), upstream = await through_router(registry, raw, fine_request)

    assert answer.status == 400, answer.raw
    assert answer.closed, "the connection must be closed after a framing error"
    assert answer.raw.count(b"HTTP/1.1") == 1  # nothing after the refusal was answered
    assert answer.json() == {"error": "bad_request", "detail": answer.json()["detail"]}  # type: ignore[index]
    assert fine.status == 200
    # The upstream saw the well-framed request alone.
    assert [r.target for r in upstream.requests] == ["/fine"]
    assert b"smuggled" not in upstream.all_bytes()
    assert b"x-admin" not in upstream.all_bytes().lower()


async def test_refusals_are_logged_once_an_interval_not_once_a_request(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    refusals = RefusalLog(interval=60.0, clock=clock)
    junk = [AMBIGUOUS["bare-lf-line-ends"], b"GET / HTTP/1.1\r\nX A: b\r\n\r\n", b"\x16\x03\x01"]
    caplog.set_level(logging.DEBUG)
    # Another test's `rma` logging set-up may have left uvicorn's logger at WARNING.
    caplog.set_level(logging.DEBUG, logger="uvicorn.error")
    async with running(registry, refusals=refusals) as router:
        for raw in junk * 10:
            assert (await send_raw(router.port, raw + b"\r\n\r\n", timeout=WAIT)).status == 400
        clock.advance(60.0)
        assert (await send_raw(router.port, junk[0], timeout=WAIT)).status == 400
        async with httpx.AsyncClient(base_url=router.url) as client:
            exposed = (await client.get("/metrics")).text
        assert "\nrma_requests_refused_total 31.0\n" in exposed

    def warned(text: str) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()
        ]

    assert refusals.total == 31
    # The first refusal at once, then the next 30 (29 within the interval, one after it).
    lines = warned("refused")
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        "refused 1 request(s) before the app since the last such line (1 in all)"
    )
    assert lines[1].startswith(
        "refused 30 request(s) before the app since the last such line (31 in all)"
    )
    assert "from 127.0.0.1" in lines[1]
    # uvicorn's own line for each malformed request is at debug.
    assert not warned("Invalid HTTP request received.")
    assert any(r.getMessage() == "Invalid HTTP request received." for r in caplog.records)


def _head_with(padding: int) -> bytes:
    start = b"GET /route/ocr/big HTTP/1.1\r\nHost: router\r\nConnection: close\r\nX-Pad: "
    return start + b"a" * (padding - len(start) - 4)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "never-ending"])
async def test_a_request_head_over_the_limit_is_431_and_never_forwarded(
    registry: Registry, whole: bool
) -> None:
    # Whole: the head and its end arrive in one read, which h11's own bound does not see.
    # Never-ending: the head's end never comes; the answer must not wait for it.
    oversized = _head_with(MAX_HEAD_BYTES + 1024) + (b"\r\n\r\n" if whole else b"")
    (answer, within), upstream = await through_router(
        registry, oversized, _head_with(MAX_HEAD_BYTES) + b"\r\n\r\n"
    )

    assert answer.status == 431, answer.raw[:200]
    assert answer.closed
    assert answer.json() == {
        "error": "head_too_large",
        "detail": f"request head over {MAX_HEAD_BYTES} bytes (RFC 6585 section 5)",
    }
    assert within.status == 200, within.raw[:200]  # the limit itself is allowed
    assert [r.target for r in upstream.requests] == ["/big"]


async def test_a_loopback_client_cannot_name_its_address_in_x_forwarded_for(
    registry: Registry,
) -> None:
    # uvicorn's default (proxy headers from 127.0.0.1) would believe it; the app decides whom to
    # believe (edge_router.cloudflare), and nothing vouches for this peer.
    (answer,), upstream = await through_router(
        registry,
        b"GET /route/ocr/who HTTP/1.1\r\nHost: router\r\nConnection: close\r\n"
        b"X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\n\r\n",
    )

    assert answer.status == 200, answer.raw[:200]
    (seen,) = upstream.requests
    assert seen.header(b"x-forwarded-for") == b"127.0.0.1"
    assert seen.header(b"x-forwarded-proto") == b"http"


CLAIMS = (
    b"Forwarded: for=198.51.100.7;proto=https\r\nX-Client-IP: 198.51.100.7\r\n"
    b"CF-IPCountry: NZ\r\nCF-Ray: 0000000000000000-SPOOF\r\n"
)


@pytest.mark.parametrize("trusted", [False, True], ids=["any-peer", "trusted-proxy"])
async def test_a_clients_address_claims_never_reach_the_worker_and_its_path_arrives_as_sent(
    registry: Registry, trusted: bool
) -> None:
    """Forwarded, X-Client-IP and CF-IPCountry are dropped; CF-Ray passes only from a trusted
    proxy; an escaped "/" in the path stays escaped (decoded, it named another resource)."""
    settings = ROBUSTNESS_CONFIG
    if trusted:
        loopback = (ipaddress.ip_network("127.0.0.1"),)
        settings = dataclasses.replace(settings, trusted_proxies=loopback)
    upstream = RawUpstream()
    async with upstream.running() as url, running(registry, settings=settings) as router:
        await register(registry, url)
        answer = await send_raw(
            router.port,
            b"GET /route/ocr/files/a%2Fb?x=%2F HTTP/1.1\r\nHost: router\r\n"
            b"Connection: close\r\n" + CLAIMS + b"\r\n",
            timeout=WAIT,
        )
        encoded = await send_raw(
            router.port,
            b"GET /route/o%63r/x HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n",
            timeout=WAIT,
        )

    assert answer.status == 200, answer.raw[:200]
    assert encoded.status == 400, encoded.raw[:200]  # the prefix itself must not be escaped
    (seen,) = upstream.requests
    assert seen.target == "/files/a%2Fb?x=%2F"
    names = {name for name, _ in seen.headers}
    assert not {b"forwarded", b"x-client-ip", b"cf-ipcountry"} & names
    assert seen.header(b"cf-ray") == (b"0000000000000000-SPOOF" if trusted else None)


async def test_chunked_and_streamed_bodies_reach_the_upstream_framed_by_the_router(
    registry: Registry,
) -> None:
    big = bytes(range(256)) * 400  # 100 KiB, over the replay limit: streamed, not buffered
    chunked_big = b"".join(
        b"%x\r\n%s\r\n" % (len(big[i : i + 8000]), big[i : i + 8000])
        for i in range(0, len(big), 8000)
    )
    (small, large, chunked), upstream = await through_router(
        registry,
        b"POST /route/ocr/small HTTP/1.1\r\nHost: router\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"POST /route/ocr/large HTTP/1.1\r\nHost: router\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(big), big),
        b"POST /route/ocr/chunked HTTP/1.1\r\nHost: router\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + chunked_big + b"0\r\n\r\n",
    )

    assert (small.status, large.status, chunked.status) == (200, 200, 200)
    first, second, third = upstream.requests
    assert (first.target, first.body) == ("/small", b"hello world")
    assert first.header(b"content-length") == b"11"  # the router's framing, not the client's
    assert first.header(b"transfer-encoding") is None
    assert (second.body, third.body) == (big, big)
    # A streamed body keeps the length its client declared (the provider sees how large an
    # upload is before reading it), written in the router's own digits; a chunked one stays
    # chunked.
    assert second.header(b"content-length") == str(len(big)).encode()
    assert second.header(b"transfer-encoding") is None
    assert third.header(b"transfer-encoding") == b"chunked"
    assert third.header(b"content-length") is None
    assert not upstream.errors


async def test_an_answer_the_worker_breaks_off_aborts_the_client_without_a_traceback(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A streamed answer broken off mid-chunk: the client's connection is closed with the answer
    incomplete (no last chunk), nothing is logged at ERROR (a worker could write a traceback a
    request), the request counts as 502 and the worker as failing."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="uvicorn.error")

    async def breaking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwo")
        await writer.drain()
        writer.close()  # mid-chunk

    server = await asyncio.start_server(breaking, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, running(registry) as router:
        record = await register(registry, url)
        answer = await send_raw(
            router.port,
            b"GET /route/ocr/stream HTTP/1.1\r\nHost: router\r\nConnection: close\r\n\r\n",
            timeout=WAIT,
        )
        await wait_for(lambda: router.count("route", 502) == 1, timeout=WAIT, message="a 502")
        failures = router.app.state.rma.proxy.health.failures(record.worker_id)

    assert answer.status == 200, answer.raw[:200]
    assert answer.closed
    assert b"hello" in answer.body  # what came before the break went on
    assert not answer.body.endswith(b"0\r\n\r\n")  # does not look complete
    assert router.count("route", 200) == 0
    assert failures == 1
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert not [r for r in caplog.records if r.exc_info]


# -- case 7: JSON limits, hang-ups, slow clients ---------------------------------------------


async def test_deeply_nested_json_is_a_clear_400_everywhere_json_is_read(
    registry: Registry,
) -> None:
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with running(registry) as router, httpx.AsyncClient(base_url=router.url) as client:
        deep = await client.post("/workers", content=b"[" * 60_000)
        nested = await client.post("/workers", content=b"[" * 40 + b"]" * 40)
        leave = await client.request("DELETE", "/workers/w1", content=b'{"a":' * 5000)
        flush = await client.post("/admin/cache/flush", content=b"[" * 60_000, headers=admin)
        shallow = await client.post("/workers", content=b"[" * 30 + b"]" * 30)
        metrics = router.count("register", 500) + router.count("admin", 500)

    for response in (deep, nested, leave, flush):
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "bad_request"
        assert "nests deeper than 32 levels" in response.json()["detail"]
    assert shallow.status_code == 422  # parsed; then refused as a record
    assert metrics == 0


async def test_clients_that_hang_up_mid_body_leave_no_traceback_and_no_500(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    upstream = RawUpstream()
    # Under the 64 KiB body limit where the body is read whole, over it where it is streamed.
    head = b"Host: router\r\nContent-Length: 60000\r\n"
    long = b"Host: router\r\nContent-Length: 100000\r\n"
    token = b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
    async with upstream.running() as url, running(registry) as router:
        await register(registry, url)
        await hang_up(router.port, b"POST /workers HTTP/1.1\r\n" + head + b"\r\n{" + b" " * 5000)
        await hang_up(
            router.port, b"POST /route/ocr/x HTTP/1.1\r\n" + long + b"\r\n" + b"z" * 70_000
        )
        await hang_up(
            router.port, b"POST /admin/cache/flush HTTP/1.1\r\n" + head + token + b"\r\n{"
        )
        await wait_for(
            lambda: sum(router.count(k, 499) for k in ("register", "route", "admin")) == 3,
            timeout=WAIT,
            message=f"three hang-ups counted as 499: {dict(router.app.state.rma.metrics.requests)}",
        )
        errors = sum(router.count(k, 500) for k in ("register", "route", "admin"))

    assert errors == 0
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    assert not upstream.requests  # the streamed body was cut: no request reached it whole


FAST = ServerLimits(head_timeout=2.0, slow_after=0.4, max_slow_per_address=3, body_timeout=1.0)


@dataclass
class Dribble:
    """A client that sends a valid request head one byte at a time."""

    port: int
    answer: bytes = b""
    closed: bool = False

    async def run(self) -> None:
        """Send a byte every 0.1 s (the pace of the attack, not a wait for anything) until the
        server closes the connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = b"GET /healthz HTTP/1.1\r\nHost: router\r\n" + b"X-Pad: " + b"a" * 1000
        try:
            for byte in head:
                writer.write(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    data = await asyncio.wait_for(reader.read(4096), 0.1)
                    self.answer += data
                    if not data:
                        break
            self.answer += await reader.read()
        except ConnectionError:
            pass
        finally:
            self.closed = True
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_slow_heads_are_bounded_per_address_and_time_out(registry: Registry) -> None:
    async with running(registry, FAST) as router:
        slow = [Dribble(router.port) for _ in range(10)]
        tasks = [asyncio.create_task(d.run()) for d in slow]
        try:
            await wait_for(
                lambda: sum(d.closed for d in slow) >= 7,
                timeout=WAIT,
                message="all but three slow connections closed",
            )
            assert router.protocol.slow_heads.count("127.0.0.1") == 3
            # A client that sends its head at once is not slow, whatever the others do.
            async with httpx.AsyncClient(base_url=router.url) as client:
                assert (await client.get("/healthz")).status_code == 200
            await wait_for(
                lambda: all(d.closed for d in slow), timeout=WAIT, message="every slow head closed"
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    answers = sorted(d.answer for d in slow)
    refused = [a for a in answers if b"too many connections" in a]
    late = [a for a in answers if b"request head not complete" in a]
    assert len(refused) == 7, answers
    assert len(late) == 3, answers
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)


async def test_idle_sockets_over_the_slow_bound_are_closed_without_an_answer(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A browser preconnects several sockets and sends nothing on most: past the per-address
    bound they are closed quietly, as a keep-alive timeout closes them; no 408 is written and
    no refusal counted. (The demo's page test logged such a refusal once, in CI.)"""
    refusals = RefusalLog()
    async with running(registry, FAST, refusals=refusals) as router:
        idle = await asyncio.gather(
            *(
                send_raw(router.port, b"", timeout=WAIT)
                for _ in range(FAST.max_slow_per_address + 3)
            )
        )
    assert all(answer.closed and answer.raw == b"" for answer in idle)
    assert refusals.total == 0
    assert "refused" not in caplog.text


async def test_idle_connections_and_stalled_bodies_are_closed(registry: Registry) -> None:
    async with running(registry, FAST) as router:
        idle = await send_raw(router.port, b"", timeout=WAIT)
        stalled = await send_raw(
            router.port,
            b"POST /workers HTTP/1.1\r\nHost: router\r\nContent-Length: 500\r\n\r\n{",
            timeout=WAIT,
        )
        await wait_for(lambda: router.count("register", 499) == 1, timeout=WAIT, message="a 499")

    assert idle.closed
    assert idle.raw == b""
    assert stalled.closed
    assert stalled.raw == b""
    assert router.count("register", 500) == 0


async def test_a_burst_of_fast_connections_from_one_address_is_not_slow(
    registry: Registry,
) -> None:
    async with running(registry, FAST) as router:
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=router.url, limits=limits) as client:
            answers = await asyncio.gather(*(client.get("/healthz") for _ in range(40)))
    assert [a.status_code for a in answers] == [200] * 40


# -- case 9: a request on a kept-alive connection the provider had closed ----------------------


async def test_a_reused_connection_closed_before_any_answer_replays_only_idempotent_requests(
    registry: Registry,
) -> None:
    """Whether the provider closed the kept-alive connection as the request came (its idle
    timeout) or took the request and died cannot be told: a POST is not sent to another
    provider (it could run twice), a PUT or a POST with an Idempotency-Key is (as Go does)."""
    # On each connection: answers one request, then closes as the next one comes.
    closing = RawUpstream(hang_up_on=2)
    other = RawUpstream()
    async with (
        closing.running() as closing_url,
        other.running() as other_url,
        running(registry) as router,
        httpx.AsyncClient(base_url=router.url) as client,
    ):
        first_choice = await register(registry, closing_url, load=0.0)
        second_choice = await register(registry, other_url, load=0.9)
        answers = []
        for method, headers in [
            ("POST", {}),
            ("POST", {"idempotency-key": "k1"}),
            ("PUT", {}),
        ]:
            # The first request of a connection is answered, the second is lost.
            answers.append(await client.request(method, "/route/ocr/job", content=b"kept"))
            answers.append(
                await client.request(method, "/route/ocr/job", content=b"lost", headers=headers)
            )

    workers = [(a.status_code, a.headers.get("x-rma-worker")) for a in answers]
    kept = (200, first_choice.worker_id)
    elsewhere = (200, second_choice.worker_id)
    assert workers == [kept, (502, None), kept, elsewhere, kept, elsewhere]
    assert "reused connection" not in answers[1].json()["detail"]
    assert len(closing.received) == 3  # each lost request went out on a kept-alive connection
    assert [r.body for r in closing.requests] == [b"kept"] * 3
    assert [(r.method, r.body) for r in other.requests] == [("POST", b"lost"), ("PUT", b"lost")]


# -- records that cannot be routed ---------------------------------------------------------


def unroutable(urls: Sequence[str]) -> list[WorkerRecord]:
    """Signed records whose tunnel URLs no policy would admit, as if one had slipped through."""
    return [make_record(tunnel_url=u, load=0.0, services=["ocr"]) for u in urls]


async def test_a_record_that_cannot_be_routed_is_skipped_never_a_500(registry: Registry) -> None:
    upstream = RawUpstream()
    async with upstream.running() as url, running(registry) as router:
        good = await register(registry, url, load=0.9)
        bad = unroutable(
            ["http://127.0.0.1\t.trycloudflare.com", "ftp://w.trycloudflare.com", "http://xn--"]
        )
        state = router.app.state.rma

        async def listed(service: str, **_: Any) -> tuple[list[WorkerRecord], str]:
            return [*bad, good], "redis"

        state.providers.find = listed
        async with httpx.AsyncClient(base_url=router.url) as client:
            answers = [await client.post("/route/ocr/job", content=b"x") for _ in range(6)]

    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert {a.headers["x-rma-worker"] for a in answers} == {good.worker_id}
    assert len(upstream.requests) == 6


async def test_the_app_refuses_ambiguous_framing_whatever_server_runs_it(
    registry: Registry,
) -> None:
    upstream = RawUpstream()
    app = router_app(registry, config=ROBUSTNESS_CONFIG)
    async with upstream.running() as url, client_for(app) as client:
        await register(registry, url)
        # httpx adds Content-Length to these bytes: both framings reach the app in one request.
        both = await client.post(
            "/route/ocr/x", content=b"abc", headers={"transfer-encoding": "chunked"}
        )
        tabbed = await client.get("/route/ocr/x", headers={"x-note": "a\tb"})

    assert both.status_code == 400
    assert "Content-Length and Transfer-Encoding" in both.json()["detail"]
    assert tabbed.status_code == 200  # a tab inside a value is allowed (RFC 9110 section 5.5)
    assert [r.target for r in upstream.requests] == ["/x"]


async def test_a_deadline_moved_later_expires_then_and_a_cleared_one_never() -> None:
    loop = asyncio.get_running_loop()
    fired: dict[str, float] = {}
    done = asyncio.Event()

    def expire(name: str) -> Callable[[], None]:
        def note() -> None:
            fired[name] = loop.time()
            if name == "last":
                done.set()

        return note

    began = loop.time()
    moved, cleared, earlier, last = (
        Deadline(expire(name)) for name in ("moved", "cleared", "earlier", "last")
    )
    moved.set(loop, 0.05)
    cleared.set(loop, 0.05)
    earlier.set(loop, 10.0)
    earlier.set(loop, 0.05)  # moved sooner than its armed timer: armed again
    last.set(loop, 0.3)
    moved.set(loop, 0.2)  # pushed back before its first time came
    cleared.clear()
    assert moved.pending
    assert not cleared.pending
    await asyncio.wait_for(done.wait(), WAIT)
    assert set(fired) == {"moved", "earlier", "last"}
    assert fired["moved"] - began >= 0.2
    assert fired["earlier"] - began < 5.0
    assert not moved.pending
