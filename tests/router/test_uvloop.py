"""The router's hot paths on uvloop, the loop uvicorn takes when it is installed (`--loop auto`)
and `bench/router_bench.py --loop uvloop` measures. uvloop's transports are not asyncio's
classes: the lean upstream connection once asserted they were, and every /route failed there
with a 500."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest

from dht_bridge.dht.node import DHTNode
from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.app import create_app
from edge_router.config import RateSettings, RouterConfig
from edge_router.server import protocol_class
from tests.support.dht import TEST_SETTINGS
from tests.support.helpers import make_record
from tests.support.redis_server import TEST_REDIS_TIMEOUT
from tests.support.router import LOOPBACK
from tests.support.upstreams import Scripted, serve

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")

if sys.platform != "win32":
    import uvloop


ROUTED = b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n" + b"u" * 1024


def test_hit_miss_and_route_on_uvloop_through_the_routers_server(redis_url: str) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(hit_miss_and_route(redis_url))


async def hit_miss_and_route(redis_url: str) -> None:
    """A cache miss and hit, a miss read from Redis and three routed requests on one upstream
    connection, through the router's own server protocol, all on uvloop."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    settings = RegistrySettings(redis_url=redis_url, timeout=TEST_REDIS_TIMEOUT)
    registry = open_registry(settings, policy=LOOPBACK)
    node = DHTNode(TEST_SETTINGS, policy=LOOPBACK)
    await node.listen()  # the router's own DHT node: a UDP endpoint of uvloop's
    upstream = Scripted(ROUTED, ROUTED, ROUTED)  # three answers
    try:
        async with upstream.running() as upstream_url:
            record = make_record(services=["ocr"], tunnel_url=upstream_url)
            assert await registry.upsert(record)
            config = RouterConfig(
                registry=settings,
                policy=LOOPBACK,
                coordinators=(node.address,),
                tunnel_proof="off",
                rates=RateSettings(register="none", route="none", admin="none"),
            )
            app = create_app(config, registry=registry, dht=node, listen_events=False)
            async with (
                app.router.lifespan_context(app),
                serve(app, http=protocol_class()) as url,
                httpx.AsyncClient(base_url=url, trust_env=False) as client,
            ):
                answers = [await client.get("/services/ocr") for _ in range(2)]
                assert [a.headers["x-cache"] for a in answers] == ["MISS", "HIT"]
                assert [p["worker_id"] for p in answers[1].json()["providers"]] == [
                    record.worker_id
                ]
                missed = await client.get("/services/ocr", params={"region": "nowhere"})
                assert (missed.headers["x-cache"], missed.json()["source"]) == ("MISS", "redis")
                for _ in range(3):
                    routed = await client.get("/route/ocr/x")
                    assert (routed.status_code, routed.content) == (200, b"u" * 1024)
        assert upstream.connections == 1  # kept alive between the routed requests
    finally:
        await node.aclose()
        await registry.aclose()
