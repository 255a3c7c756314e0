"""A bridge in a process of its own leaves its figures in Redis, so the routers' topology page
shows its lag and journal (it said "n/a" before)."""

from __future__ import annotations

from pathlib import Path

from dht_bridge.registry.registry import Registry
from tests.support.bridge import running_bridge, start_bridge_node
from tests.support.dht import NetworkFactory
from tests.support.helpers import wait_for
from tests.support.router import client_for, router_app


async def test_a_bridge_reports_its_figures_and_the_topology_shows_them(
    registry: Registry, network_factory: NetworkFactory, tmp_path: Path
) -> None:
    seeds = await network_factory(2)
    node = await start_bridge_node(seeds[0])
    try:
        async with running_bridge(node, registry, tmp_path / "journal.jsonl") as bridge:

            async def reported() -> bool:
                return bool(await registry.bridge_reports())

            await wait_for(reported, timeout=10, message="the bridge's report in Redis")
            (report,) = await registry.bridge_reports()
            assert report["bridge"] == node.node.id.hex()
            assert report["figures"]["rma_bridge_journal_records"] == bridge.journal.depth
            # The router has no bridge in its process: the figures come from Redis.
            async with client_for(router_app(registry)) as client:
                shown = (await client.get("/topology")).json()["figures"]
            assert shown["bridges"] == 1
            assert "bridge_sync_lag_seconds" in shown
            assert shown["bridge_journal_records"] == 0
    finally:
        await node.aclose()


async def test_a_report_lapses_with_its_lifetime(registry: Registry) -> None:
    await registry.report_bridge("b" * 40, {"rma_bridge_sync_lag_seconds": 1.5}, ttl=0.2)
    assert [r["figures"] for r in await registry.bridge_reports()] == [
        {"rma_bridge_sync_lag_seconds": 1.5}
    ]

    async def lapsed() -> bool:
        return not await registry.bridge_reports()

    await wait_for(lapsed, timeout=5, message="the report's key to lapse")
