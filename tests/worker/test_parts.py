"""The agent's parts on their own: backoff, the edge client's accounting and error mapping,
load sources, discovery without a DHT, and the edge-only path against a real router."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dht_bridge.backoff import Backoff, ExponentialBackoff, jittered
from dht_bridge.errors import ConfigError
from dht_bridge.identity import Identity
from dht_bridge.registry.registry import Registry
from edge_router.config import RouterConfig
from tests.support.dht import network_of
from tests.support.helpers import POLICY, make_record, wait_for
from tests.support.upstreams import refusing_port, serve, url_of
from tests.support.worker import EDGE_URL, Edge, running_edge, worker_config
from worker.agent import Mode, WorkerAgent
from worker.discovery import discover
from worker.edge import DEFAULT_PEERS_TTL, MAX_PEERS, MAX_PEERS_TTL, EdgeClient, Registered
from worker.errors import EdgeRefused, EdgeUnavailable, StartError
from worker.load import HttpLoad, InFlightCounter, StaticLoad


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(ExponentialBackoff(base=1, cap=8, jitter=0.5), random.Random(7))
    delays = [backoff.next() for _ in range(6)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() <= 1
    rng = random.Random(3)
    assert all(27 <= jittered(30, 0.1, rng) <= 33 for _ in range(100))
    with pytest.raises(ValueError, match="backoff"):
        ExponentialBackoff(base=2, cap=1)


def edge_with(handler: httpx.MockTransport) -> EdgeClient:
    return EdgeClient(EDGE_URL, policy=POLICY, transport=handler)


async def test_edge_client_counts_every_request_by_kind_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = make_record()
    forged = make_record().to_dict() | {"load": 0.5}  # signature no longer matches

    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/dht/bootstrap":
            peers = [{"host": "10.0.0.1", "port": 4000}, {"host": "", "port": 1}, "junk"]
            return httpx.Response(200, json={"peers": peers, "ttl": 120})
        if path == "/services/ocr":
            return httpx.Response(200, json={"providers": [good.to_dict(), forged]})
        if request.method == "POST":
            status = {1: 200, 2: 202, 3: 409}[json.loads(request.content)["seq"]]
            return httpx.Response(status, json={})
        return httpx.Response(200, json={})

    edge = edge_with(httpx.MockTransport(answer))
    try:
        with caplog.at_level(logging.INFO, logger="worker.edge"):
            peers = await edge.bootstrap()
            providers = await edge.services("ocr")
            outcomes = [await edge.register(make_record(seq=seq)) for seq in (1, 2, 3)]
            await edge.leave(make_record(seq=4, tombstone=True))
    finally:
        await edge.aclose()
    assert (peers.peers, peers.ttl) == ((("10.0.0.1", 4000),), 120.0)
    assert [p.worker_id for p in providers] == [good.worker_id]
    assert outcomes == [Registered.APPLIED, Registered.STORED_IN_DHT, Registered.STALE]
    assert edge.counts == {"bootstrap": 1, "services": 1, "register": 3, "leave": 1}
    assert edge.total == 6
    assert "(edge requests: 6 (bootstrap 1, leave 1, register 3, services 1))" in caplog.text
    assert "1 of the 3 peers the edge named are usable" in caplog.text


@pytest.mark.parametrize("body", [{}, {"peers": "10.0.0.1:4000"}, [], {"peers": [["h", 1]]}])
async def test_a_bootstrap_answer_naming_no_usable_peer_says_so(
    body: object, caplog: pytest.LogCaptureFixture
) -> None:
    edge = edge_with(httpx.MockTransport(lambda _: httpx.Response(200, json=body)))
    try:
        with caplog.at_level(logging.WARNING, logger="worker.edge"):
            assert (await edge.bootstrap()).peers == ()
    finally:
        await edge.aclose()
    assert " 0 of the " in caplog.text
    assert "peers the edge named are usable" in caplog.text


# What a hostile or broken edge answers to /dht/bootstrap?region=<case>: status and body.
HOSTILE_ANSWERS = {
    "deep": (200, b"[" * 100_000 + b"]" * 100_000),
    "deep-error": (503, b"{" + b'"a":{' * 50_000 + b"}" * 50_001),
    "huge": (200, b'{"peers": [' + b'{"host": "127.0.0.1", "port": 1}, ' * 40_000 + b"{}]}"),
    "many": (
        200,
        json.dumps({"peers": [{"host": "127.0.0.1", "port": 1 + i} for i in range(5000)]}).encode(),
    ),
}


async def hostile_edge(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app answering each case of HOSTILE_ANSWERS, or ("slow") one byte every 0.1 s."""
    if scope["type"] != "http":
        return
    case = dict(parse_qsl(scope["query_string"].decode())).get("region", "")
    status, body = HOSTILE_ANSWERS.get(case, (200, b""))
    await send({"type": "http.response.start", "status": status, "headers": []})
    if case != "slow":
        await send({"type": "http.response.body", "body": body})
        return
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        while not gone.is_set():
            await send({"type": "http.response.body", "body": b" ", "more_body": True})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), 0.1)  # the drip's pace
    finally:
        watcher.cancel()


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("deep", "nests deeper than"),
        ("deep-error", "edge answered 503"),
        ("huge", "answer is over 1048576 bytes"),
        ("slow", "no whole answer within 1 s"),
    ],
)
async def test_a_hostile_edge_fails_the_request_not_the_worker(case: str, why: str) -> None:
    async with serve(hostile_edge) as url:
        edge = EdgeClient(url, policy=POLICY, timeout=1.0)
        try:
            with pytest.raises(EdgeUnavailable, match=why):
                await asyncio.wait_for(edge.bootstrap(region=case), 10)
        finally:
            await edge.aclose()


async def test_a_bootstrap_answer_is_read_for_its_first_peers_only() -> None:
    async with serve(hostile_edge) as url:
        edge = EdgeClient(url, policy=POLICY)
        try:
            peers = (await edge.bootstrap(region="many")).peers
        finally:
            await edge.aclose()
    assert peers == tuple(("127.0.0.1", 1 + i) for i in range(MAX_PEERS))


@pytest.mark.parametrize(
    ("ttl", "good_for"),
    [
        (b"120", 120.0),
        (b"1" + b"0" * 400, MAX_PEERS_TTL),  # float() of it raises OverflowError
        (b"1e400", DEFAULT_PEERS_TTL),  # json reads it as inf
        (b"Infinity", DEFAULT_PEERS_TTL),
        (b"NaN", DEFAULT_PEERS_TTL),
        (b"-5", DEFAULT_PEERS_TTL),
        (b"true", DEFAULT_PEERS_TTL),
        (b"1e9", MAX_PEERS_TTL),
    ],
)
async def test_a_bootstrap_answers_ttl_is_finite_positive_and_capped(
    ttl: bytes, good_for: float
) -> None:
    # Else a huge integer raised OverflowError out of start(), and Infinity meant the worker
    # never asked the edge for peers again.
    body = b'{"peers": [{"host": "127.0.0.1", "port": 9}], "ttl": ' + ttl + b"}"
    edge = edge_with(httpx.MockTransport(lambda _: httpx.Response(200, content=body)))
    try:
        assert (await edge.bootstrap()).ttl == good_for
    finally:
        await edge.aclose()


async def test_a_bootstrap_peer_whose_host_no_resolver_takes_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A label over 63 characters made getaddrinfo raise UnicodeError out of the agent's start.
    async with network_of(3) as nodes:
        bad = ["a" * 64 + ".example", "x\x00y", "é" * 10, "a..b", "-a.example", "a" * 254]
        named = [{"host": host, "port": 4000} for host in bad]
        good = [{"host": "localhost", "port": 1}, {"host": "::1", "port": 2}]
        good.append({"host": nodes[0].address[0], "port": nodes[0].address[1]})
        answer = {"peers": [*named, *good], "ttl": 60}
        transport = httpx.MockTransport(lambda _: httpx.Response(200, json=answer))
        agent = WorkerAgent(worker_config(tmp_path, "w-hosts"), edge_transport=transport)
        with caplog.at_level(logging.WARNING, logger="worker.edge"):
            async with agent:
                assert agent.mode is Mode.DHT
                assert agent._edge_peers is not None
                assert agent._edge_peers.peers == (("localhost", 1), ("::1", 2), nodes[0].address)
    assert f"3 of the {len(bad) + 3} peers the edge named are usable" in caplog.text


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, EdgeUnavailable), (429, EdgeUnavailable), (422, EdgeRefused), (404, EdgeRefused)],
)
async def test_edge_errors_are_mapped(status: int, error: type[Exception]) -> None:
    edge = edge_with(httpx.MockTransport(lambda _: httpx.Response(status, json={"detail": "no"})))
    try:
        with pytest.raises(error, match="no"):
            await edge.register(make_record())
    finally:
        await edge.aclose()
    assert edge.counts == {"register": 1}


async def test_an_unreachable_edge_is_unavailable_and_still_counted() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    edge = edge_with(httpx.MockTransport(refuse))
    try:
        with pytest.raises(EdgeUnavailable, match="refused"):
            await edge.bootstrap()
        found = await discover("ocr", limit=5, node=None, edge=edge, deadline=0.3)
    finally:
        await edge.aclose()
    assert (found.source, found.providers) == ("none", [])
    assert "not on the DHT" in found.detail
    assert edge.counts == {"bootstrap": 1, "services": 1}


async def test_load_sources() -> None:
    assert await StaticLoad(1.7)() == 1.0
    counter = InFlightCounter(capacity=4)
    entered, release = asyncio.Event(), asyncio.Event()

    async def work(request: Request) -> JSONResponse:
        entered.set()
        await release.wait()
        return JSONResponse({})

    app = counter.middleware(Starlette(routes=[Route("/", work)]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=EDGE_URL) as c:
        request = asyncio.get_running_loop().create_task(c.get("/"))
        await asyncio.wait_for(entered.wait(), 5)
        assert await counter() == 0.25
        release.set()
        assert (await request).status_code == 200
    assert await counter() == 0.0

    answers = iter(
        [httpx.Response(200, json={"load": 0.3}), httpx.Response(200, json={"in_flight": 3})]
    )
    polled = HttpLoad(
        "http://127.0.0.1:9/load",
        capacity=6,
        fallback=0.2,
        transport=httpx.MockTransport(lambda _: next(answers, httpx.Response(500))),
    )
    try:
        assert [await polled(), await polled(), await polled()] == [0.3, 0.5, 0.2]
    finally:
        await polled.aclose()


async def test_a_worker_whose_load_url_does_not_answer_reports_itself_full(
    tmp_path: Path, edge: Edge
) -> None:
    """Its service is likely down: a load of 0 would make routers prefer it over the others."""
    with refusing_port() as dead:
        config = worker_config(tmp_path, "w-load", load=0.1, load_url=url_of(dead) + "/load")
        async with edge.agent(config) as agent:
            assert agent.record is not None
            assert agent.record.load == 1.0


async def test_edge_only_worker_heartbeats_through_the_edge_and_recovers_a_stale_seq(
    tmp_path: Path, registry: Registry
) -> None:
    config = worker_config(tmp_path, "w-edge", edge_only=True)
    identity = Identity.generate()
    identity.save(config.state_file.with_suffix(".key"))
    # A copy of this worker (state file lost since) registered seq 50 at the edge.
    earlier = make_record(identity, seq=50, tunnel_url=config.tunnel_url, ttl=60)
    assert await registry.upsert(earlier)
    async with running_edge(registry, RouterConfig()) as edge:
        async with edge.agent(config) as agent:
            assert agent.node is None
            assert agent.mode is Mode.EDGE
            assert agent.record is not None
            assert agent.record.seq == 51
            # 409 stale, a lookup of its own record, then the registration that took.
            assert agent.edge_requests == {"register": 2, "services": 1}
            await wait_for(
                lambda: agent.edge_requests["register"] >= 4,
                timeout=10,
                message="heartbeats through the edge",
            )
            assert await edge.lookup() == [agent.worker_id]
        assert agent.edge_requests["leave"] == 1
        assert await edge.lookup() == []


async def test_a_stopped_agent_refuses_a_second_start_and_a_new_one_takes_over(
    tmp_path: Path, registry: Registry
) -> None:
    # aclose() closes the edge client made with the agent: a second start failed later with
    # httpx's RuntimeError ("the client has been closed"), in the middle of a join.
    config = worker_config(tmp_path, "w-twice", edge_only=True)
    async with running_edge(registry, RouterConfig()) as edge:
        agent = edge.agent(config)
        async with agent:
            assert agent.mode is Mode.EDGE
        with pytest.raises(StartError, match="make a new WorkerAgent"):
            await agent.start()
        assert agent.edge_requests == {"register": 1, "leave": 1}  # nothing more was sent
        async with edge.agent(config) as again:  # the state file was left free
            assert again.mode is Mode.EDGE
            assert again.worker_id == agent.worker_id
            assert await edge.lookup() == [again.worker_id]


async def test_a_discovery_asks_the_edge_for_no_more_than_the_edge_accepts(
    registry: Registry,
) -> None:
    # A cache asks for twice the providers wanted (spares): 120 for 60, past the edge's 100.
    for _ in range(3):
        assert await registry.upsert(make_record(services=["ocr"]))
    async with running_edge(registry, RouterConfig()) as edge:
        client = EdgeClient(EDGE_URL, policy=POLICY, transport=edge.transport())
        try:
            found = await discover("ocr", limit=120, node=None, edge=client, deadline=1.0)
        finally:
            await client.aclose()
    assert (found.source, len(found.providers)) == ("edge", 3), found.detail


async def test_a_discovery_through_the_edge_keeps_each_workers_newest_live_record() -> None:
    # Signed records all, but an edge (or a replay at its address) may list a tombstone, an
    # older seq of a worker, and one record many times: all came back as providers.
    gone, busy, idle = Identity.generate(), Identity.generate(), Identity.generate()
    newer = make_record(busy, seq=2, load=0.7)
    listed = [
        make_record(gone, seq=4, load=0.1),
        make_record(gone, seq=5, tombstone=True),
        make_record(busy, seq=1, load=0.0),
        newer,
        newer,
        newer,
        make_record(idle, seq=3, load=0.2),
        make_record(idle, seq=1, now=0.0, ttl=10.0),  # lapsed long ago
    ]
    answer = {"providers": [record.to_dict() for record in listed]}
    edge = edge_with(httpx.MockTransport(lambda _: httpx.Response(200, json=answer)))
    try:
        found = await discover("ocr", limit=10, node=None, edge=edge, deadline=0.5)
    finally:
        await edge.aclose()
    assert found.source == "edge"
    assert [(r.worker_id, r.seq) for r in found.providers] == [
        (idle.worker_id, 3),
        (busy.worker_id, 2),
    ]


@pytest.mark.parametrize(
    ("service", "limit", "wrong"),
    [
        ("BAD NAME", 10, "does not match"),
        ("ocr", 0, "from 1 to 100"),
        ("ocr", 101, "from 1 to 100"),
    ],
)
@pytest.mark.parametrize("fresh", [False, True])
async def test_a_discovery_no_provider_could_answer_is_refused_before_asking(
    tmp_path: Path, service: str, limit: int, wrong: str, fresh: bool
) -> None:
    agent = WorkerAgent(worker_config(tmp_path, "w-ask", edge_url="http://127.0.0.1:1"))
    with pytest.raises(ConfigError, match=wrong):
        await agent.discover(service, limit, fresh=fresh)
    assert agent.edge_requests == {}
