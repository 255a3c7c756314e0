"""The routing proxy against real upstream HTTP servers (uvicorn on loopback ports from the OS).

`Proxy.forward` is driven through a one-route Starlette app, as the router mounts it; the
providers' tunnel URLs point at loopback, which the tests admit with an explicitly widened
`TunnelPolicy(allow_loopback=True)`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import random
import time
import tracemalloc
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dht_bridge.errors import RecordInvalid, RMAError
from dht_bridge.logcontext import log_fields
from dht_bridge.records import WorkerRecord, validate
from dht_bridge.registry.registry import Registry
from dht_bridge.tunnels import TunnelPolicy
from edge_router.app import create_app
from edge_router.config import RouterConfig
from edge_router.errors import BadRequest, error_response
from edge_router.upstream import proxy as proxy_module
from edge_router.upstream.proxy import (
    ProviderHealth,
    Proxy,
    ProxySettings,
    retry_after_seconds,
    target_path,
    upstream_client,
    upstream_url,
)
from tests.support.helpers import ManualClock, make_record
from tests.support.streaming import StreamingUpstream
from tests.support.upstreams import (
    METHODS,
    Upstream,
    header,
    header_names,
    refusing_port,
    serve,
    url_of,
)

# The tests, and only they, let tunnel URLs point at loopback.
LOOPBACK = TunnelPolicy(allow_loopback=True)
CLIENT = ("203.0.113.7", 40000)  # a documentation address
IDLE, BUSY = 0.0, 0.9  # with two providers, the less loaded is always tried first


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    """Servers and sockets a test opens, closed when it ends."""
    async with AsyncExitStack() as stack:
        yield stack


@pytest.fixture(params=["httpcore", "router"])
async def http(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """The proxy's outbound client (no proxies from the environment on loopback): httpx's own,
    and the router's (its pool and lean HTTP/1.1 connections, edge_router.upstream.http11)."""
    made = (
        httpx.AsyncClient(trust_env=False)
        if request.param == "httpcore"
        else upstream_client(ProxySettings())
    )
    async with made as client:
        yield client


@pytest.fixture
def clock() -> ManualClock:
    """The proxy's monotonic clock, moved by hand."""
    return ManualClock(1000.0)


def provider(url: str, *, load: float = IDLE, **fields: Any) -> WorkerRecord:
    """A signed record advertising `url`, checked against the widened policy."""
    record = make_record(tunnel_url=url, load=load, **fields)
    validate(record, LOOPBACK, now=time.time())
    return record


def make_proxy(
    http: httpx.AsyncClient, clock: ManualClock, *, seed: int = 1, **settings: Any
) -> Proxy:
    """A proxy with a seeded rng on the manual clock."""
    return Proxy(http, ProxySettings(**settings), clock=clock, rng=random.Random(seed))


def pick(proxy: Proxy, providers: Sequence[WorkerRecord], exclude: Collection[str] = ()) -> str:
    """The worker id `proxy.choose` picks (there must be one)."""
    chosen = proxy.choose(providers, exclude)
    assert chosen is not None
    return chosen.worker_id


def front(proxy: Proxy, providers: Sequence[WorkerRecord]) -> Starlette:
    """The router's route, reduced to the proxy call and the JSON error handler."""

    async def route(request: Request) -> Response:
        service = request.path_params["service"]
        return await proxy.forward(
            request,
            service,
            f"/{service}",
            providers,
            client_ip=request.client.host if request.client else None,
            cf_ray=request.headers.get("cf-ray"),
        )

    async def on_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    return Starlette(
        routes=[Route("/{service}/{path:path}", route, methods=METHODS)],
        exception_handlers={RMAError: on_error},
    )


@contextlib.asynccontextmanager
async def edge(proxy: Proxy, providers: Sequence[WorkerRecord]) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of `front`, connecting from CLIENT."""
    transport = httpx.ASGITransport(app=front(proxy, providers), client=CLIENT)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge.test") as client:
        yield client


async def start(stack: AsyncExitStack, upstream: Upstream) -> str:
    """Run `upstream` until the test ends; its base URL."""
    return await stack.enter_async_context(upstream.running())


def refusing(stack: AsyncExitStack) -> str:
    """A URL on which connections are refused for the rest of the test."""
    return url_of(stack.enter_context(refusing_port()))


# -- pass-through ----------------------------------------------------------------------------


def test_loopback_tunnels_need_the_widened_policy() -> None:
    record = make_record(tunnel_url="http://127.0.0.1:8080")
    with pytest.raises(RecordInvalid):
        TunnelPolicy().check(record.tunnel_url)
    LOOPBACK.check(record.tunnel_url)


async def test_get_passes_status_headers_path_query_and_body(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    up = Upstream(
        "a",
        status=203,
        headers=[("x-upstream-note", "hi"), ("set-cookie", "a=1"), ("set-cookie", "b=2")],
    )
    url = await start(stack, up)
    record = provider(url + "/base")
    async with edge(make_proxy(http, clock), [record]) as client:
        response = await client.get(
            "/ocr/some/path%3Fx/%C3%A9", params=[("q", "a b"), ("q", "2")], headers={"x-c": "y"}
        )

    assert response.status_code == 203
    assert response.headers["x-upstream-note"] == "hi"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["x-rma-worker"] == record.worker_id
    [seen] = up.seen
    assert response.json() == seen
    assert seen["method"] == "GET"
    assert seen["raw_path"] == "/base/some/path%3Fx/%C3%A9"
    assert seen["query"] == "q=a+b&q=2"
    assert header(seen, "x-c") == "y"
    assert header(seen, "host") == url.removeprefix("http://")
    assert len(http.cookies.jar) == 0  # the shared client remembers no user's cookies


async def test_post_passes_body_and_status(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    up = Upstream("a", status=201)
    record = provider(await start(stack, up))
    body = b'{"image": "' + b"x" * 5000 + b'"}'
    async with edge(make_proxy(http, clock), [record]) as client:
        response = await client.post(
            "/ocr/jobs", content=body, headers={"content-type": "application/json"}
        )

    assert response.status_code == 201
    [seen] = up.seen
    assert seen["method"] == "POST"
    assert seen["body"].encode() == body
    assert header(seen, "content-type") == "application/json"
    assert header(seen, "content-length") == str(len(body))
    assert response.json()["body"].encode() == body


async def test_hop_by_hop_headers_are_removed_both_ways(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    hop = [
        ("connection", "x-named-hop"),
        ("x-named-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authenticate", "Basic"),
        ("trailer", "x-trail"),
        ("upgrade", "h2c"),
        ("x-rma-worker", "forged"),
    ]
    up = Upstream("a", headers=[*hop, ("x-end-to-end", "kept")])
    url = await start(stack, up)
    direct = await http.get(url + "/direct")
    # The upstream really sends them; the proxy is what takes them off.
    assert {k for k, _ in hop} <= set(direct.headers.keys())

    record = provider(url)
    async with edge(make_proxy(http, clock), [record]) as client:
        response = await client.get(
            "/ocr/x",
            headers={
                "connection": "x-secret-hop",
                "x-secret-hop": "1",
                "keep-alive": "300",
                "te": "trailers",
                "proxy-authorization": "Basic Zm9vOmJhcg==",
                "upgrade": "h2c",
                "trailer": "x-t",
                "x-rma-origin-secret": "s3cret",
                "cf-connecting-ip": "192.0.2.66",
                "x-end-to-end": "kept",
            },
        )

    assert response.status_code == 200
    for name, _ in hop:
        if name != "x-rma-worker":
            assert name not in response.headers, name
    assert response.headers.get_list("x-rma-worker") == [record.worker_id]
    assert response.headers["x-end-to-end"] == "kept"
    assert "server" not in response.headers  # the router's server names itself
    seen = header_names(up.seen[-1])
    removed = {"connection", "x-secret-hop", "keep-alive", "te", "proxy-authorization"}
    removed |= {"upgrade", "trailer", "x-rma-origin-secret", "cf-connecting-ip"}
    assert not removed & seen
    assert "x-end-to-end" in seen


async def test_forwarded_headers_and_cf_ray(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    up = Upstream("a")
    record = provider(await start(stack, up))
    async with edge(make_proxy(http, clock), [record]) as client:
        await client.get(
            "/ocr/a",
            headers={
                "x-forwarded-for": "198.51.100.1",
                "x-forwarded-proto": "https",
                "cf-ray": "8f00aa11bb22-LHR",
            },
        )
        await client.get("/ocr/b")

    chained, plain = up.seen
    # The client's own chain is not passed on: only the address the router resolved.
    assert header(chained, "x-forwarded-for") == "203.0.113.7"
    assert header(chained, "x-forwarded-proto") == "http"
    assert header(chained, "x-forwarded-host") == "edge.test"
    assert header(chained, "cf-ray") == "8f00aa11bb22-LHR"
    assert header(plain, "x-forwarded-for") == "203.0.113.7"
    assert header(plain, "cf-ray") is None


# -- failures and retries ----------------------------------------------------------------------


async def test_connect_failure_is_retried_on_another_provider(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    up = Upstream("alive")
    alive = provider(await start(stack, up), load=BUSY)
    dead = provider(refusing(stack), load=IDLE)
    proxy = make_proxy(http, clock)
    async with edge(proxy, [dead, alive]) as client:
        response = await client.post("/ocr/run", content=b"payload")

    assert response.status_code == 200
    assert response.headers["x-rma-worker"] == alive.worker_id
    assert up.seen[0]["body"] == "payload"
    assert proxy.health.failures(dead.worker_id) == 1
    assert proxy.health.failures(alive.worker_id) == 0


async def test_streamed_body_is_retried_when_no_byte_was_sent(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    up = Upstream("alive")
    alive = provider(await start(stack, up), load=BUSY)
    dead = provider(refusing(stack), load=IDLE)
    body = bytes(range(256)) * 64  # 16 KiB, far over the replay limit below

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    proxy = make_proxy(http, clock, replay_limit=100)
    async with edge(proxy, [dead, alive]) as client:
        response = await client.post("/ocr/run", content=chunks())

    assert response.status_code == 200
    assert response.headers["x-rma-worker"] == alive.worker_id
    assert up.seen[0]["body"].encode("latin-1") == body
    assert proxy.health.failures(dead.worker_id) == 1


async def test_provider_is_ejected_after_consecutive_failures_until_the_clock_passes(
    stack: AsyncExitStack,
    http: httpx.AsyncClient,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = Upstream("alive")
    alive = provider(await start(stack, up), load=BUSY)
    dead = provider(refusing(stack), load=IDLE)
    proxy = make_proxy(http, clock, eject_after=3, eject_for=30.0)
    caplog.set_level(logging.WARNING, logger="edge_router.upstream.proxy")
    async with edge(proxy, [dead, alive]) as client:
        for attempt in range(1, 4):
            assert (await client.get("/ocr/x")).status_code == 200
            assert proxy.health.failures(dead.worker_id) == attempt
        assert proxy.health.status(dead.worker_id) == "ejected"
        assert any(dead.worker_id in r.getMessage() for r in caplog.records)

        # Ejected: never chosen, so requests go straight to the other provider.
        assert {pick(proxy, [dead, alive]) for _ in range(50)} == {alive.worker_id}
        assert (await client.get("/ocr/x")).status_code == 200
        assert proxy.health.failures(dead.worker_id) == 3

        clock.advance(29.0)
        assert proxy.health.status(dead.worker_id) == "ejected"
        clock.advance(1.5)
        assert proxy.health.available(dead.worker_id)
        # Back in rotation; still down, so its first failure ejects it again.
        assert (await client.get("/ocr/x")).status_code == 200
        assert proxy.health.failures(dead.worker_id) == 4
        assert proxy.health.status(dead.worker_id) == "ejected"


@pytest.mark.parametrize("status", [429, 503])  # a 503 with Retry-After says "later" too
async def test_429_or_503_with_retry_after_marks_the_provider_busy_and_another_serves(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock, status: int
) -> None:
    limited = Upstream("limited", status=status, headers=[("retry-after", "120")])
    ok = Upstream("ok")
    busy = provider(await start(stack, limited), load=IDLE)
    free = provider(await start(stack, ok), load=BUSY)
    proxy = make_proxy(http, clock)
    async with edge(proxy, [busy, free]) as client:
        response = await client.post("/ocr/run", content=b"small")

    assert response.status_code == 200
    assert response.headers["x-rma-worker"] == free.worker_id
    assert ok.seen[0]["body"] == "small"
    assert len(limited.seen) == 1
    assert proxy.health.status(busy.worker_id) == "busy"
    assert proxy.health.failures(busy.worker_id) == 0  # busy is not broken
    clock.advance(119.0)
    assert proxy.health.status(busy.worker_id) == "busy"
    clock.advance(2.0)
    assert proxy.health.available(busy.worker_id)


async def test_429_is_passed_on_when_the_body_cannot_be_replayed(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    limited = Upstream("limited", status=429, headers=[("retry-after", "7")])
    ok = Upstream("ok")
    busy = provider(await start(stack, limited), load=IDLE)
    free = provider(await start(stack, ok), load=BUSY)
    proxy = make_proxy(http, clock, replay_limit=16)
    async with edge(proxy, [busy, free]) as client:
        response = await client.post("/ocr/run", content=b"z" * 1024)

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-rma-worker"] == busy.worker_id
    assert not ok.seen
    assert proxy.health.status(busy.worker_id) == "busy"


async def test_tunnel_not_connected_530_counts_as_a_failure_and_is_retried(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    gone = Upstream("gone", status=530)
    ok = Upstream("ok")
    down = provider(await start(stack, gone), load=IDLE)
    alive = provider(await start(stack, ok), load=BUSY)
    proxy = make_proxy(http, clock)
    async with edge(proxy, [down, alive]) as client:
        response = await client.put("/ocr/run", content=b"again")

    assert response.status_code == 200
    assert response.headers["x-rma-worker"] == alive.worker_id
    assert proxy.health.failures(down.worker_id) == 1


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_workers_gateway_error_fails_the_try_and_a_safe_request_goes_elsewhere(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock, status: int
) -> None:
    """cloudflared answers 502 when the volunteer's service behind it is down (a reverse proxy
    502 or 504): the worker is not healthy, though something answered."""
    broken_service = Upstream("broken", status=status)
    ok = Upstream("ok")
    broken = provider(await start(stack, broken_service), load=IDLE)
    alive = provider(await start(stack, ok), load=BUSY)
    proxy = make_proxy(http, clock, eject_after=3)
    async with edge(proxy, [broken, alive]) as client:
        got = await client.get("/ocr/page")
        assert (got.status_code, got.headers["x-rma-worker"]) == (200, alive.worker_id)
        assert proxy.health.failures(broken.worker_id) == 1
        # Not safe to send twice: the worker's answer is the client's, and still a failure.
        posted = await client.post("/ocr/jobs", content=b"once")
        assert (posted.status_code, posted.headers["x-rma-worker"]) == (status, broken.worker_id)
        assert posted.json()["upstream"] == "broken"  # the worker's own body, not ours
        assert proxy.health.failures(broken.worker_id) == 2
        await client.get("/ocr/page")
        assert proxy.health.status(broken.worker_id) == "ejected"  # three in a row
        assert (await client.post("/ocr/jobs", content=b"x")).status_code == 200
    assert [s["method"] for s in ok.seen] == ["GET", "GET", "POST"]


async def test_a_gateway_error_no_one_else_can_take_is_passed_on(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    only = provider(await start(stack, Upstream("only", status=502)))
    proxy = make_proxy(http, clock)
    async with edge(proxy, [only]) as client:
        response = await client.get("/ocr/page")
    assert (response.status_code, response.json()["upstream"]) == (502, "only")
    assert proxy.health.failures(only.worker_id) == 1


async def test_broken_exchange_is_retried_for_safe_methods_only(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    stack.push_async_callback(server.wait_closed)
    stack.callback(server.close)
    rude = provider(url_of(server.sockets[0]), load=IDLE)
    ok = Upstream("ok")
    alive = provider(await start(stack, ok), load=BUSY)
    proxy = make_proxy(http, clock)
    async with edge(proxy, [rude, alive]) as client:
        got = await client.get("/ocr/read")
        posted = await client.post("/ocr/write", content=b"once only")

    assert got.status_code == 200
    assert got.headers["x-rma-worker"] == alive.worker_id
    # The provider may have acted on the POST before hanging up: it is not sent twice.
    assert posted.status_code == 502
    assert "exchange broken" in posted.json()["detail"]
    assert [s["method"] for s in ok.seen] == ["GET"]
    assert proxy.health.failures(rude.worker_id) == 2


async def test_a_worker_that_refuses_an_upload_unread_is_answered_and_stays_healthy(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    """A worker's service that answers 413 to a body over its limit without reading it (as a
    Starlette app checking Content-Length does) answers the client; it is not a broken
    exchange, and a few large uploads do not get a healthy worker ejected."""

    async def limited(request: Request) -> Response:
        if int(request.headers.get("content-length", "0")) > 1024:
            return Response(b"too large", status_code=413)
        return Response(b"took " + str(len(await request.body())).encode())

    app = Starlette(routes=[Route("/{path:path}", limited, methods=["POST"])])
    worker = provider(await stack.enter_async_context(serve(app)))
    proxy = make_proxy(http, clock, eject_after=3)
    upload = b"u" * (16 * 1024 * 1024)
    async with edge(proxy, [worker]) as client:
        for _ in range(4):
            refused = await client.post("/ocr/pages", content=upload)
            assert (refused.status_code, refused.content) == (413, b"too large")
        assert proxy.health.failures(worker.worker_id) == 0
        took = await client.post("/ocr/pages", content=b"small")
        assert (took.status_code, took.content) == (200, b"took 5")


async def test_every_provider_down_gives_502_json(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    down = [provider(refusing(stack)) for _ in range(3)]
    proxy = make_proxy(http, clock)  # max_attempts=2
    async with edge(proxy, down) as client:
        all_down = await client.get("/ocr/x")
    failures = [proxy.health.failures(r.worker_id) for r in down]
    async with edge(proxy, down[:1]) as client:
        alone = await client.get("/ocr/x")

    assert all_down.status_code == 502
    assert all_down.headers["content-type"] == "application/json"
    body = all_down.json()
    assert body["error"] == "bad_gateway"
    assert body["detail"].count("connection failed") == 2
    tried = [r.worker_id in body["detail"] for r in down]
    assert sorted(tried) == [False, True, True]  # the first try and one retry, no more
    assert failures == [int(t) for t in tried]
    assert alone.status_code == 502
    assert "no other healthy provider" in alone.json()["detail"]


async def test_nothing_healthy_gives_503_json(http: httpx.AsyncClient, clock: ManualClock) -> None:
    ejected = provider("http://127.0.0.1:9")
    proxy = make_proxy(http, clock, eject_after=1)
    proxy.health.record_failure(ejected.worker_id)
    async with edge(proxy, [ejected]) as client:
        none_healthy = await client.get("/ocr/x")
    async with edge(proxy, []) as client:
        none_known = await client.get("/ocr/x")

    assert none_healthy.status_code == 503
    assert none_healthy.json() == {
        "error": "no_provider",
        "detail": "no healthy provider of 'ocr' (1 known: 1 ejected)",
    }
    assert none_known.status_code == 503
    assert none_known.json()["detail"] == "no provider of 'ocr' is registered"


async def test_slow_upstream_gives_504(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    up = Upstream("slow")
    record = provider(await start(stack, up))
    proxy = make_proxy(http, clock, read_timeout=0.3)
    async with edge(proxy, [record]) as client:
        response = await client.get("/ocr/slow")

    assert response.status_code == 504
    assert response.json()["error"] == "gateway_timeout"
    assert record.worker_id in response.json()["detail"]
    # A step towards ejection, as a gateway's 504 is; one slow answer ejects nobody.
    assert proxy.health.failures(record.worker_id) == 1
    assert proxy.health.available(record.worker_id)


async def test_a_worker_that_never_answers_is_ejected_after_consecutive_timeouts(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    silent = provider(await start(stack, Upstream("silent")), load=IDLE)
    alive = provider(await start(stack, Upstream("alive")), load=BUSY)
    proxy = make_proxy(http, clock, read_timeout=0.3, eject_after=3)
    async with edge(proxy, [silent, alive]) as client:
        for _ in range(3):  # the less loaded is tried first
            assert (await client.get("/ocr/slow")).status_code == 504
        assert proxy.health.status(silent.worker_id) == "ejected"
        served = await client.get("/ocr/fast")
    assert served.status_code == 200
    assert served.headers["x-rma-worker"] == alive.worker_id


async def test_dot_segments_are_refused(http: httpx.AsyncClient, clock: ManualClock) -> None:
    record = provider("http://127.0.0.1:9/api")
    async with edge(make_proxy(http, clock), [record]) as client:
        response = await client.get("/ocr/%2E%2E/admin")
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


# -- streaming ------------------------------------------------------------------------------

TOTAL = 64 * 1024 * 1024
GATE = 3.0  # seconds a side waits for the other before the test fails as "buffered"


async def test_64_mib_bodies_stream_both_ways_without_buffering(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    up = StreamingUpstream(TOTAL, GATE)
    record = provider(await stack.enter_async_context(serve(up.app)))
    # A real server in front too: httpx's ASGITransport collects a whole response body.
    base = await stack.enter_async_context(serve(front(make_proxy(http, clock), [record])))
    client = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=GATE))

    tracemalloc.start()
    try:
        posted = await client.post(base + "/ocr/sink", content=up.upload())
        streamed, received, crc = await up.download(client, base + "/ocr/source")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    expected = up.expected_crc()
    assert posted.status_code == 200
    assert posted.json() == {"size": TOTAL, "crc": expected}
    assert streamed.status_code == 200
    assert streamed.headers["x-rma-worker"] == record.worker_id
    assert (received, crc) == (TOTAL, expected)
    assert peak < TOTAL // 8, f"peak traced memory {peak / 2**20:.1f} MiB"


# -- choice and health -----------------------------------------------------------------------


def test_choose_prefers_less_loaded_providers(http: httpx.AsyncClient, clock: ManualClock) -> None:
    light, medium, heavy = (
        provider(f"http://127.0.0.1:{9 + i}", load=x) for i, x in enumerate((0.1, 0.5, 0.9))
    )
    proxy = make_proxy(http, clock, seed=7)
    picks = collections.Counter(pick(proxy, [light, medium, heavy]) for _ in range(3000))
    # Two random choices out of three: the lightest wins 2/3 of draws, the middle 1/3.
    assert picks[heavy.worker_id] == 0
    assert 1800 < picks[light.worker_id] < 2200
    assert 800 < picks[medium.worker_id] < 1200


def test_choose_skips_excluded_ejected_busy_and_tombstoned(
    http: httpx.AsyncClient, clock: ManualClock
) -> None:
    records = [provider(f"http://127.0.0.1:{9 + i}") for i in range(4)]
    gone = provider("http://127.0.0.1:20", tombstone=True)
    ok, excluded, ejected, busy = records
    proxy = make_proxy(http, clock, eject_after=1)
    proxy.health.record_failure(ejected.worker_id)
    proxy.health.mark_busy(busy.worker_id, 10.0)
    everyone = [*records, gone]
    assert {pick(proxy, everyone, exclude={excluded.worker_id}) for _ in range(50)} == {
        ok.worker_id
    }
    assert proxy.choose(everyone, exclude={ok.worker_id, excluded.worker_id}) is None


def test_health_success_resets_failures_but_not_busy(clock: ManualClock) -> None:
    health = ProviderHealth(ProxySettings(eject_after=3, eject_for=30.0), clock=clock)
    assert not health.record_failure("w")
    assert not health.record_failure("w")
    health.record_success("w")
    assert health.failures("w") == 0
    assert not health.record_failure("w")
    assert not health.record_failure("w")
    assert health.available("w")
    assert health.record_failure("w")
    assert health.status("w") == "ejected"
    health.record_success("w")  # a request that was already in flight came back fine
    assert health.available("w")

    health.mark_busy("v", 5.0)
    health.record_success("v")  # a 200 that raced the 429
    assert health.status("v") == "busy"
    health.mark_busy("v", 1.0)  # never shortens the earlier mark
    clock.advance(4.0)
    assert health.status("v") == "busy"
    clock.advance(1.5)
    assert health.available("v")


def test_health_forgets_idle_workers_beyond_its_bound(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_module, "_MAX_TRACKED", 3)
    health = ProviderHealth(ProxySettings(eject_after=1), clock=clock)
    health.record_failure("ejected")
    health.mark_busy("busy", 10.0)
    health.mark_busy("was-busy", 1.0)
    clock.advance(2.0)
    health.record_failure("new")
    assert health.status("ejected") == "ejected"
    assert health.status("busy") == "busy"
    assert health.failures("new") == 1
    assert len(health) == 3  # "was-busy" had nothing left to remember


def test_retry_after_seconds() -> None:
    now = 1_800_000_000.0

    def parse(value: str | None) -> float:
        return retry_after_seconds(value, now=now, default=5.0, cap=300.0)

    assert parse("120") == 120.0
    assert parse(" 0 ") == 0.0
    assert parse(None) == 5.0
    assert parse("soon") == 5.0
    assert parse("-3") == 5.0
    assert parse("100000") == 300.0
    assert parse(email.utils.formatdate(now + 90, usegmt=True)) == pytest.approx(90.0)
    assert parse(email.utils.formatdate(now - 90, usegmt=True)) == 0.0
    assert parse(email.utils.formatdate(now + 9000, usegmt=True)) == 300.0
    assert parse(email.utils.formatdate(now + 60)) == pytest.approx(60.0)  # "-0000": UTC too


@pytest.mark.parametrize(
    ("tunnel_url", "path", "query", "expected"),
    [
        ("http://127.0.0.1:9", b"/a/b", b"", "http://127.0.0.1:9/a/b"),
        ("https://w.trycloudflare.com", b"", b"", "https://w.trycloudflare.com/"),
        (
            "https://w.trycloudflare.com/api",
            b"/v1/run",
            b"x=1",
            "https://w.trycloudflare.com/api/v1/run?x=1",
        ),
        ("https://w.trycloudflare.com/api/", b"/v1/", b"", "https://w.trycloudflare.com/api/v1/"),
        # The path as the client sent it: an escaped "/" is not a "/", escapes stay escaped.
        (
            "https://w.trycloudflare.com",
            b"/files/a%2Fb/%C3%A9%3F%23",
            b"",
            "https://w.trycloudflare.com/files/a%2Fb/%C3%A9%3F%23",
        ),
        # What a request line cannot carry, or httpx refuses, is escaped.
        (
            "https://w.trycloudflare.com",
            b"/a b/\xc3\xa9#x",
            b"",
            "https://w.trycloudflare.com/a%20b/%C3%A9%23x",
        ),
        (
            "https://w.trycloudflare.com",
            b"/.well-known/a..b/.../x.y",
            b"",
            "https://w.trycloudflare.com/.well-known/a..b/.../x.y",
        ),
        (
            "https://w.trycloudflare.com",
            b"/%252e%252e/x",
            b"",
            "https://w.trycloudflare.com/%252e%252e/x",
        ),
        (
            "https://w.trycloudflare.com",
            b"//evil.example/x",
            b"",
            "https://w.trycloudflare.com/evil.example/x",
        ),
    ],
)
def test_upstream_url_joins_the_tunnel_path_and_the_route_path(
    tunnel_url: str, path: bytes, query: bytes, expected: str
) -> None:
    url = upstream_url(tunnel_url, target_path(path, query))
    assert str(url) == expected
    assert url.host == httpx.URL(tunnel_url).host


@pytest.mark.parametrize(
    "path",
    [
        b"/..",
        b"/a/../b",
        b"/./a",
        b"/a/.",
        b"/a/./b",
        b"/%2e%2e/a",
        b"/a/.%2E",
        b"/%2E/a",
        b"/a%2F..%2Fb",  # a server that decodes before it resolves sees "a/../b"
        b"/a%2f%2e",
    ],
)
def test_dot_segments_cannot_climb_out_of_the_tunnel_path(path: bytes) -> None:
    with pytest.raises(BadRequest):
        target_path(path, b"")


async def test_each_answer_from_a_worker_is_timed_for_its_service(
    stack: AsyncExitStack, http: httpx.AsyncClient, clock: ManualClock
) -> None:
    url = await start(stack, Upstream("a"))
    timed: list[tuple[str, float]] = []
    proxy = Proxy(http, ProxySettings(), clock=clock, observe=lambda s, t: timed.append((s, t)))
    async with edge(proxy, [provider(url)]) as client:
        assert (await client.get("/ocr/x")).status_code == 200
    assert [service for service, _ in timed] == ["ocr"]
    assert 0 < timed[0][1] < 10


async def test_log_lines_while_routing_carry_the_requests_cf_ray(
    registry: Registry,
) -> None:
    seen: list[object] = []
    app = create_app(RouterConfig(), registry=registry, listen_events=False)

    async def probe(request: Request) -> Response:
        seen.append(dict(log_fields()))
        return Response("ok")

    app.router.routes.insert(0, Route("/probe", probe))
    transport = httpx.ASGITransport(app=app, client=CLIENT)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge.test") as client:
        await client.get("/probe", headers={"cf-ray": "8f1d2c3b4a5e6f70-AMS"})
        await client.get("/probe")
    assert seen == [{"cf_ray": "8f1d2c3b4a5e6f70-AMS"}, {}]
