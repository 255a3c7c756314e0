"""The edge router through its real app: cache states, stampedes, fallbacks, registration,
admin flush, bootstrap, Cloudflare headers, errors, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from dht_bridge.backoff import NoBackoff
from dht_bridge.errors import ConfigError
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, tombstone_for
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.config import CacheSettings, RouterConfig
from edge_router.events import listen_for_events
from edge_router.metrics import MAX_SERVICE_LABELS
from edge_router.providers import DHT_READS
from tests.support.dht import ManualClock, publish_all, start_network, stop_all
from tests.support.helpers import POLICY, make_record, wait_for
from tests.support.redis_server import RedisServer
from tests.support.router import ADMIN_TOKEN, client_for, router_app

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def private_registry(server: RedisServer) -> Registry:
    return open_registry(RegistrySettings(redis_url=server.url, timeout=0.5), policy=POLICY)


async def test_lookup_moves_through_miss_hit_stale_and_503(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    registry = await private_registry(server)
    clock = ManualClock(0.0)
    config = RouterConfig(admin_token=ADMIN_TOKEN, cache=CacheSettings(ttl=5, stale=60))
    records = [make_record(services=["ocr"], load=load) for load in (0.5, 0.1, 0.3)]
    for record in records:
        await registry.upsert(record)
    try:
        async with client_for(router_app(registry, config=config, monotonic=clock)) as client:
            first = await client.get("/services/ocr")
            assert first.status_code == 200
            assert first.headers["x-cache"] == "MISS"
            assert first.json()["source"] == "redis"
            assert [p["load"] for p in first.json()["providers"]] == [0.1, 0.3, 0.5]
            assert "stale-if-error=60" in first.headers["cache-control"]
            assert "stale-while-revalidate" in first.headers["cdn-cache-control"]
            second = await client.get("/services/ocr?limit=2")
            assert second.headers["x-cache"] == "HIT"
            assert second.json()["source"] == "cache"
            assert len(second.json()["providers"]) == 2
            clock.advance(6)
            assert (await client.get("/services/ocr")).headers["x-cache"] == "MISS"
            server.kill()
            clock.advance(6)
            stale = await client.get("/services/ocr")
            assert stale.status_code == 200
            assert stale.headers["x-cache"] == "STALE"
            assert "stale" in stale.headers["warning"].lower()
            assert len(stale.json()["providers"]) == 3
            clock.advance(61)
            gone = await client.get("/services/ocr")
            assert gone.status_code == 503
            assert gone.json()["error"] == "unavailable"
    finally:
        await registry.aclose()


async def test_concurrent_misses_make_one_backend_read(registry: Registry) -> None:
    await registry.upsert(make_record(services=["gpu"]))
    app = router_app(registry)
    state = app.state.rma
    calls = 0
    release = asyncio.Event()
    real_find = state.providers.find

    async def gated_find(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        await release.wait()
        return await real_find(*args, **kwargs)

    state.providers.find = gated_find
    async with client_for(app) as client:
        requests = [asyncio.ensure_future(client.get("/services/gpu")) for _ in range(50)]
        await wait_for(lambda: calls >= 1, timeout=10, message="the first backend read")
        await asyncio.sleep(0)  # let the other 49 reach the cache
        release.set()
        answers = await asyncio.gather(*requests)
    assert calls == 1
    assert all(a.status_code == 200 and len(a.json()["providers"]) == 1 for a in answers)
    assert sorted(a.headers["x-cache"] for a in answers).count("MISS") == 50


async def test_lookups_come_from_the_dht_when_redis_is_down(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    registry = await private_registry(server)
    nodes = await start_network(12)
    try:
        records = [make_record(services=["asr"], load=i / 10) for i in range(4)]
        await publish_all(nodes, records)
        server.kill()
        async with client_for(router_app(registry, dht=nodes[0])) as client:
            answer = await client.get("/services/asr")
            assert answer.status_code == 200
            assert answer.json()["source"] == "dht"
            assert {p["worker_id"] for p in answer.json()["providers"]} == {
                r.worker_id for r in records
            }
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json()["redis"] is False
    finally:
        await stop_all(nodes)
        await registry.aclose()


async def test_lookups_of_made_up_names_cost_the_dht_no_more_than_its_read_budget(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    server = make_redis_server()
    registry = await private_registry(server)
    nodes = await start_network(6)
    clock = ManualClock(0.0)
    per_second = DHT_READS[0].amount
    try:
        async with client_for(router_app(registry, dht=nodes[0], monotonic=clock)) as client:

            async def made_up(count: int) -> list[httpx.Response]:
                names = [f"made-up-{secrets.token_hex(6)}" for _ in range(count)]
                return [await client.get(f"/services/{name}") for name in names]

            async def figures() -> dict[str, float]:
                return dict((await client.get("/topology")).json()["figures"])

            # Redis up and knowing nobody: the DHT is asked only within the budget, and every
            # lookup still answers (Redis's empty answer).
            sent = nodes[0].rpc.stats.packets_out
            answers = await made_up(3 * per_second)
            assert all(a.status_code == 200 and a.json()["providers"] == [] for a in answers)
            assert [a.json()["source"] for a in answers].count("dht") == per_second
            assert (await figures())["dht_reads_refused"] == 2 * per_second
            assert len(nodes[0].reader.depth_hints) == per_second
            budgeted = nodes[0].rpc.stats.packets_out - sent

            clock.advance(2.0)  # the sliding window past: the budget again, and no more
            answers = await made_up(2 * per_second)
            assert [a.json()["source"] for a in answers].count("dht") == per_second
            assert nodes[0].rpc.stats.packets_out - sent < 3 * budgeted

            # Redis down: the DHT is the only source; over the budget a new name gets 503,
            # a name read before its cached answer.
            server.kill()
            clock.advance(2.0)
            known = await client.get("/services/made-up-known")
            assert known.status_code == 200
            assert known.json()["source"] == "dht"
            answers = await made_up(per_second)
            assert {a.status_code for a in answers} == {200, 503}
            clock.advance(10.0)  # the known name's answer is no longer fresh
            for _ in range(per_second):
                await client.get(f"/services/made-up-{secrets.token_hex(6)}")
            again = await client.get("/services/made-up-known")
            assert again.status_code == 200
            assert again.headers["x-cache"] == "STALE"
            metrics = (await client.get("/metrics")).text
            assert "rma_dht_reads_refused_total" in metrics
    finally:
        await stop_all(nodes)
        await registry.aclose()


async def test_registration_fallback_path(registry: Registry) -> None:
    identity = Identity.generate()
    record = make_record(identity, seq=3, services=["ocr"])
    async with client_for(router_app(registry)) as client:
        stored = await client.post("/workers", json=record.to_dict())
        assert stored.status_code == 200
        assert stored.json() == {
            "worker_id": record.worker_id,
            "seq": 3,
            "applied": True,
            "stored_in": "redis",
        }
        again = await client.post("/workers", json=record.to_dict())
        assert again.status_code == 409
        assert again.json()["error"] == "stale_record"
        assert len((await client.get("/services/ocr")).json()["providers"]) == 1
        tombstone = tombstone_for(identity, record, now=time.time())
        wrong = await client.request("DELETE", f"/workers/{'0' * 40}", json=tombstone.to_dict())
        assert wrong.status_code == 400
        not_tomb = await client.request(
            "DELETE", f"/workers/{identity.worker_id}", json=make_record(identity, seq=9).to_dict()
        )
        assert not_tomb.status_code == 422
        left = await client.request(
            "DELETE", f"/workers/{identity.worker_id}", json=tombstone.to_dict()
        )
        assert left.status_code == 200
        assert (await client.get("/services/ocr")).json()["providers"] == []
    held = await registry.get(identity.worker_id)
    assert held is not None
    assert held.tombstone


@pytest.mark.parametrize(
    "tunnel_url",
    [
        "https://127.0.0.1",
        "https://169.254.169.254/latest/meta-data",
        "https://10.1.2.3",
        "https://192.168.0.10:8443",
        "https://[::1]:443",
        "http://w1.trycloudflare.com",
        "https://localhost",
        "https://internal.example.com",
    ],
)
async def test_ssrf_attempts_are_refused_at_registration(
    registry: Registry, tunnel_url: str
) -> None:
    record = make_record(tunnel_url=tunnel_url)
    async with client_for(router_app(registry)) as client:
        answer = await client.post("/workers", json=record.to_dict())
    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_record"
    assert "tunnel_url" in answer.json()["detail"]
    assert await registry.get(record.worker_id) is None


async def test_bad_bodies_get_clear_errors(registry: Registry) -> None:
    config = RouterConfig(admin_token=ADMIN_TOKEN, max_body=2048)
    record = make_record()
    forged = dataclasses.replace(record, load=0.9).to_dict()
    async with client_for(router_app(registry, config=config)) as client:
        too_big = await client.post("/workers", content=b"x" * 4096)
        assert too_big.status_code == 413
        assert too_big.json()["error"] == "too_large"
        bad_json = await client.post("/workers", content=b"{not json")
        assert bad_json.status_code == 400
        forged_answer = await client.post("/workers", json=forged)
        assert forged_answer.status_code == 422
        assert "signature" in forged_answer.json()["detail"]
        missing = await client.post("/workers", json={"worker_id": record.worker_id})
        assert missing.status_code == 422
        empty = await client.post("/workers")
        assert empty.status_code == 400
        assert "POST /workers takes the worker's signed record" in empty.json()["detail"]
        leave = await client.delete(f"/workers/{record.worker_id}")
        assert leave.status_code == 400
        assert "signed tombstone as its JSON body" in leave.json()["detail"]
        assert (await client.get("/nowhere")).json()["error"] == "not_found"
        assert (await client.put("/workers")).status_code == 405
        assert (await client.get("/services/Bad_Name")).status_code == 400
        assert (await client.get("/services/ocr?limit=0")).status_code == 400
    assert await registry.get(record.worker_id) is None


async def test_flush_requires_the_admin_token(registry: Registry) -> None:
    await registry.upsert(make_record(services=["ocr"]))
    async with client_for(router_app(registry)) as client:
        await client.get("/services/ocr")
        assert (await client.post("/admin/cache/flush", json={})).status_code == 401
        wrong = await client.post(
            "/admin/cache/flush", json={}, headers={"Authorization": "Bearer nope-nope-nope-nope"}
        )
        assert wrong.status_code == 403
        assert (await client.get("/services/ocr")).headers["x-cache"] == "HIT"
        one = await client.post("/admin/cache/flush", json={"service": "ocr"}, headers=AUTH)
        assert one.status_code == 200
        assert one.json() == {"flushed": 1, "service": "ocr", "propagated": True}
        assert (await client.get("/services/ocr")).headers["x-cache"] == "MISS"
        bad = await client.post("/admin/cache/flush", json={"service": 5}, headers=AUTH)
        assert bad.status_code == 400
    disabled = router_app(registry, config=RouterConfig())
    async with client_for(disabled) as client:
        answer = await client.post("/admin/cache/flush", json={}, headers=AUTH)
        assert answer.status_code == 403
        assert "disabled" in answer.json()["detail"]


async def test_a_flush_on_one_router_reaches_another_sharing_redis(registry: Registry) -> None:
    await registry.upsert(make_record(services=["ocr"]))
    first, second = router_app(registry), router_app(registry)
    async with client_for(first) as one, client_for(second) as two:
        await wait_for(
            lambda: second.state.rma.events_connected,
            timeout=10,
            message="the second router to subscribe",
        )
        await two.get("/services/ocr")
        assert (await two.get("/services/ocr")).headers["x-cache"] == "HIT"
        answer = await one.post("/admin/cache/flush", json={}, headers=AUTH)
        assert answer.json()["propagated"] is True
        await wait_for(
            lambda: len(second.state.rma.lookups) == 0,
            timeout=10,
            message="the flush to reach the second router",
        )
        assert (await two.get("/services/ocr")).headers["x-cache"] == "MISS"


async def test_events_listener_warns_once_an_outage_and_says_when_it_is_back(
    make_redis_server: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_redis_server()
    registry = open_registry(RegistrySettings(redis_url=server.url, timeout=1.0), policy=POLICY)
    state = router_app(registry).state.rma
    stop = asyncio.Event()
    caplog.set_level(logging.DEBUG, logger="edge_router.events")
    server.kill()
    listener = asyncio.create_task(listen_for_events(state, stop, NoBackoff()))
    try:
        await wait_for(
            lambda: sum("events connection lost" in r.message for r in caplog.records) >= 5,
            timeout=20,
            message="five failed subscriptions",
        )
        lost = [r for r in caplog.records if "events connection lost" in r.message]
        assert [r.levelno for r in lost[:2]] == [logging.WARNING, logging.DEBUG]
        assert all(r.levelno == logging.DEBUG for r in lost[1:])
        server.start()
        await wait_for(lambda: state.events_connected, timeout=20, message="resubscribed")
        back = [r.message for r in caplog.records if "again, after" in r.message]
        assert len(back) == 1
        assert "failed attempts" in back[0]
    finally:
        stop.set()
        await asyncio.wait_for(listener, 10)
        await registry.aclose()


async def test_bootstrap_hands_out_coordinators_then_server_workers(registry: Registry) -> None:
    near = make_record(region="de", dht_host="127.0.0.1", dht_port=4101, seq=50)
    far_old = make_record(region="us", dht_host="127.0.0.1", dht_port=4102, seq=90)
    client_mode = make_record(region="de")  # no DHT address: never handed out
    for record in (near, far_old, client_mode):
        await registry.upsert(record)
    config = RouterConfig(admin_token=ADMIN_TOKEN, coordinators=(("127.0.0.1", 4000),))
    async with client_for(router_app(registry, config=config)) as client:
        answer = await client.get("/dht/bootstrap?region=de")
        assert answer.status_code == 200
        peers = answer.json()["peers"]
        assert [p["port"] for p in peers] == [4000, 4101, 4102]
        assert peers[0]["kind"] == "coordinator"
        assert peers[1]["node_id"] == near.worker_id
        assert "max-age" in answer.headers["cache-control"]
        assert "max-age" in answer.headers["cdn-cache-control"]
        assert answer.json()["ttl"] > 0
        us = (await client.get("/dht/bootstrap?region=us")).json()["peers"]
        assert [p["port"] for p in us] == [4000, 4102, 4101]


async def test_bootstrap_scans_the_registry_once_whatever_the_regions_asked(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    for region in ("de", "us"):
        await registry.upsert(make_record(region=region, dht_host="127.0.0.1", dht_port=4100))
    scans = 0
    scan = registry.records

    async def counted(**kwargs: int) -> list[WorkerRecord]:
        nonlocal scans
        scans += 1
        return await scan(**kwargs)

    monkeypatch.setattr(registry, "records", counted)
    async with client_for(router_app(registry)) as client:
        for i in range(50):
            answer = await client.get(f"/dht/bootstrap?region=made-up-{i}")
            assert answer.status_code == 200
        firsts = {
            region: (await client.get(f"/dht/bootstrap?region={region}")).json()["peers"][0]
            for region in ("de", "us")
        }
    assert scans == 1
    assert {region: peer["region"] for region, peer in firsts.items()} == {"de": "de", "us": "us"}


async def test_bootstrap_with_no_known_peer_is_503(registry: Registry) -> None:
    await registry.upsert(make_record())  # a client-mode worker: not a peer
    async with client_for(router_app(registry)) as client:
        answer = await client.get("/dht/bootstrap")
    assert answer.status_code == 503
    assert answer.json()["error"] == "no_provider"


async def test_country_header_is_trusted_only_from_cloudflare(registry: Registry) -> None:
    de = make_record(region="de", load=0.9)
    us = make_record(region="us", load=0.1)
    for record in (de, us):
        await registry.upsert(record)
    app = router_app(registry)
    headers = {"CF-IPCountry": "DE", "CF-Connecting-IP": "198.51.100.9"}
    async with client_for(app) as spoofed:
        order = [
            p["region"]
            for p in (await spoofed.get("/services/ocr", headers=headers)).json()["providers"]
        ]
        assert order == ["us", "de"]  # header ignored: least loaded first
    async with client_for(app, peer=("173.245.48.10", 443)) as cloudflare:
        order = [
            p["region"]
            for p in (await cloudflare.get("/services/ocr", headers=headers)).json()["providers"]
        ]
        assert order == ["de", "us"]
    resolver = app.state.rma.resolver
    assert not resolver.peer_trusted(_fake_request(CLIENT_PEER, headers))
    assert resolver.peer_trusted(_fake_request(("2606:4700::1", 443), headers))


async def test_query_parameters_override_the_defaults_and_bad_ones_are_400(
    registry: Registry,
) -> None:
    de = make_record(region="de", load=0.9)
    us = make_record(region="us", load=0.1)
    for record in (de, us):
        await registry.upsert(record)
    headers = {"CF-IPCountry": "DE"}

    async def regions(client: httpx.AsyncClient, path: str) -> list[str]:
        answer = await client.get(path, headers=headers)
        assert answer.status_code == 200, answer.text
        return [p["region"] for p in answer.json()["providers"]]

    async with client_for(router_app(registry), peer=("173.245.48.10", 443)) as cloudflare:
        assert await regions(cloudflare, "/services/ocr") == ["de", "us"]  # the country
        assert await regions(cloudflare, "/services/ocr?region=US") == ["us", "de"]
        # An empty region asks for none, even with the country header beside it.
        assert await regions(cloudflare, "/services/ocr?region=") == ["us", "de"]
        assert await regions(cloudflare, "/services/ocr?limit=1") == ["de"]
        assert await regions(cloudflare, "/services/ocr?cap=gpu=true") == []
        for query, message in [
            ("limit=", "limit must be"),
            ("limit=abc", "limit must be"),
            ("limit=0", "limit must be"),
            ("limit=1&limit=x", "limit must be"),  # the last value counts, as in Starlette
            ("region=e%20u", "region must match"),
            ("region=" + "a" * 33, "region must match"),
        ]:
            answer = await cloudflare.get(f"/services/ocr?{query}", headers=headers)
            assert answer.status_code == 400, query
            assert message in answer.json()["detail"], query


CLIENT_PEER = ("203.0.113.7", 40000)


def _fake_request(peer: tuple[str, int], headers: dict[str, str]) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": peer,
    }
    return Request(scope)


def test_client_address_resolution_ignores_spoofing() -> None:
    from edge_router.cloudflare import CLOUDFLARE_RANGES, ClientResolver

    resolver = ClientResolver(CLOUDFLARE_RANGES, origin_secret="s3cret-shared-with-worker")
    spoof = {"CF-Connecting-IP": "198.51.100.9", "X-Forwarded-For": "198.51.100.10"}
    assert resolver.client_ip(_fake_request(CLIENT_PEER, spoof)) == "203.0.113.7"
    assert resolver.client_ip(_fake_request(("162.158.1.1", 1), spoof)) == "198.51.100.9"
    bad = _fake_request(("162.158.1.1", 1), {"CF-Connecting-IP": "not-an-ip"})
    assert resolver.client_ip(bad) == "162.158.1.1"
    worker = {**spoof, "X-RMA-Origin-Secret": "s3cret-shared-with-worker"}
    assert resolver.client_ip(_fake_request(CLIENT_PEER, worker)) == "198.51.100.10"
    wrong = {**spoof, "X-RMA-Origin-Secret": "guess"}
    assert resolver.client_ip(_fake_request(CLIENT_PEER, wrong)) == "203.0.113.7"


async def test_metrics_count_requests_by_class(registry: Registry) -> None:
    await registry.upsert(make_record(services=["ocr"]))
    await registry.upsert(make_record(services=["gpu"], dht_host="127.0.0.1", dht_port=4200))
    async with client_for(router_app(registry)) as client:
        await client.get("/services/ocr")
        await client.get("/services/ocr")
        await client.get("/dht/bootstrap")
        await client.post("/workers", content=b"{}")
        await client.get("/topology")  # the operator's page: not counted against the budget
        await client.get("/healthz")
        text = (await client.get("/metrics")).text
        topology = (await client.get("/topology")).json()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("rma_requests_total", (("class", "lookup"), ("status", "200")))] == 2
    assert ("rma_requests_total", (("class", "register"), ("status", "422"))) in samples
    assert samples[("rma_cache_hits_total", ())] == 1
    assert samples[("rma_edge_requests_today", ())] == 4  # 2 lookups, 1 bootstrap, 1 register
    assert topology["services"] == {"ocr": 1, "gpu": 1}
    assert topology["figures"]["cache_hits"] == 1
    # Each worker's DHT mode, and the count of each (client: no DHT address in its record).
    assert sorted(w["mode"] for w in topology["workers"]) == ["client", "server"]
    assert samples[("rma_dht_servers", ())] == 1
    assert samples[("rma_dht_clients", ())] == 1
    assert topology["figures"]["dht_servers"] == 1
    assert topology["figures"]["dht_clients"] == 1
    assert json.dumps(topology)


async def test_metrics_parse_with_prometheus_types_histograms_and_no_duplicates(
    registry: Registry,
) -> None:
    await registry.upsert(make_record(services=["ocr"]))
    # The worker's service, in process: every path answers 200.
    worker = Starlette(routes=[Route("/{path:path}", lambda _: PlainTextResponse("done"))])
    tunnels = httpx.AsyncClient(transport=httpx.ASGITransport(app=worker))
    async with tunnels, client_for(router_app(registry, http=tunnels)) as client:
        await client.get("/services/ocr")  # a miss
        await client.get("/services/ocr")  # a hit
        assert (await client.get("/route/ocr/x")).text == "done"
        for n in range(MAX_SERVICE_LABELS + 5):  # 503: no provider; names any client can invent
            assert (await client.get(f"/route/nobody-{n}/x")).status_code == 503
        answer = await client.get("/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=")
    families = list(text_string_to_metric_families(answer.text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a metric family is exposed twice"
    series = [(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples]
    assert len(series) == len(set(series)), "a series is exposed twice"
    kinds = {f.name: f.type for f in families}
    # Every counter is typed as one (they were gauges once, without _total).
    for name in ("rma_requests", "rma_cache_hits", "rma_backend_reads", "rma_events_received"):
        assert kinds[name] == "counter", name
    assert kinds["rma_request_duration_seconds"] == "histogram"
    assert kinds["rma_upstream_duration_seconds"] == "histogram"
    routes = {dict(s.labels).get("route") for f in families for s in f.samples}
    assert {"lookup_miss", "lookup_hit", "route:ocr", "route:other"} <= routes
    assert not any(r and r.startswith("route:nobody") for r in routes)  # no series per name
    assert "process_cpu_seconds" in kinds
    assert all(f.documentation for f in families), "a family without HELP"


async def test_topology_and_metrics_say_when_the_registry_holds_more_than_they_read(
    registry: Registry,
) -> None:
    for service in ("ocr", "gpu", "asr"):
        await registry.upsert(make_record(services=[service]))
    small = RouterConfig(topology_limit=2)
    async with client_for(router_app(registry, config=small)) as client:
        cut = (await client.get("/topology")).json()
        cut_metrics = (await client.get("/metrics")).text
    async with client_for(router_app(registry)) as client:
        whole = (await client.get("/topology")).json()
        whole_metrics = (await client.get("/metrics")).text
    assert (len(cut["workers"]), cut["truncated"]) == (2, True)
    assert "rma_topology_truncated 1.0\n" in cut_metrics
    assert (len(whole["workers"]), whole["truncated"]) == (3, False)
    assert "rma_topology_truncated 0.0\n" in whole_metrics


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RMA_SHUTDOWN_TIMEOUT": "inf"}, "RMA_SHUTDOWN_TIMEOUT"),  # was a traceback at start
        ({"RMA_PROXY_READ_TIMEOUT": "nan"}, "RMA_PROXY_READ_TIMEOUT"),
        ({"RMA_PROXY_CONNECT_TIMEOUT": "0"}, "RMA_PROXY_CONNECT_TIMEOUT"),
        ({"RMA_PROXY_MAX_CONNECTIONS": "0"}, "RMA_PROXY_MAX_CONNECTIONS"),
        ({"RMA_RATE_ROUTE": "0/minute"}, "RMA_RATE_ROUTE: '0/minute' would refuse every request"),
        ({"RMA_ORIGIN_SECRET": "short"}, "RMA_ORIGIN_SECRET must be at least 16"),
    ],
)
def test_router_settings_that_cannot_work_are_refused_naming_them(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        RouterConfig.build(environ=environ)
