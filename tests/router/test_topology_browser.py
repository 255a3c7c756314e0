"""The topology page in a real browser: headless Chromium against the router under uvicorn.

The first test serves 20 real records from the test redis-server: 3 services and 2 regions, some
of them DHT servers, two of which left (tombstones), and one coordinator. It waits (with a
deadline) until the page has drawn them, counts the drawn worker nodes, reads the figures, saves
a screenshot to test-artifacts/, then adds a worker and waits for the page to redraw by itself,
and gives the router a bridge figure and waits for the page to show it.

The second serves 2,000 workers (tests/support/fleet.py), one cell of which holds more than a
cell can draw, at desktop and at phone width: every worker is accounted for (drawn, or counted in
an aggregated cell), the figures add up, nothing is cut off or wider than the phone, and the
page's own polling never reaches the edge budget.

Skipped when Chromium is not installed, except in CI (CI=true), where that fails.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, tombstone_for
from dht_bridge.registry.registry import Registry
from edge_router import handlers
from edge_router.app import create_app
from edge_router.config import CacheSettings, RouterConfig
from tests.support.browser import BrowserBinaries, chromium, require_browser
from tests.support.fleet import BIG_CELL, fleet, store
from tests.support.helpers import make_record, wait_for
from tests.support.router import ADMIN_TOKEN
from tests.support.upstreams import serve

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOT = ARTIFACTS / "topology.png"
DRAW_TIMEOUT = 30.0  # page load, first fetch and drawing, on a loaded 2-core machine
BIG_DRAW_TIMEOUT = 90.0  # the same with 2,000 workers, where a round may take seconds
BIG = 2000
DESKTOP = (1440, 1100)
PHONE = (390, 844)
NO_VALUE = "\N{EN DASH}"  # what a figure card shows when it has no value
COORDINATOR = ("127.0.0.1", 4000)
# Service sets of the 20 workers: 3 services, one group offering two of them.
SERVICE_SETS = [("ocr",)] * 8 + [("gpu",)] * 6 + [("embed",)] * 4 + [("gpu", "ocr")] * 2
REGIONS = ("eu-west", "us-east")
LEAVING = (3, 10)  # indexes of the workers that leave (client-mode ones, never peers)

# What the page shows, read in one go: the hooks topology.js documents.
READ_PAGE = """
const workers = [...document.querySelectorAll("#topology circle.worker")];
const figures = {};
for (const card of document.querySelectorAll("[data-figure]")) {
  const detail = card.querySelector(".detail");
  figures[card.dataset.figure] = {
    value: card.querySelector(".value").textContent,
    detail: detail.textContent,
    // Text the card cuts off: more lines or a wider line than its box shows.
    clipped:
      detail.scrollHeight > detail.clientHeight + 1 || detail.scrollWidth > detail.clientWidth + 1,
  };
}
const aggregates = [...document.querySelectorAll("#topology g.aggregate")].map((g) => ({
  group: g.dataset.group,
  region: g.dataset.region,
  count: Number(g.dataset.count),
  live: Number(g.dataset.live),
  left: Number(g.dataset.left),
  bars: [...g.querySelectorAll("rect.bar")].reduce((n, bar) => n + Number(bar.dataset.count), 0),
}));
const svg = document.getElementById("topology");
const box = svg.viewBox.baseVal;
const texts = [...svg.querySelectorAll("text")].map((t) => t.getBBox());
return {
  state: document.body.dataset.state,
  renders: Number(document.body.dataset.renders || 0),
  ids: workers.map((w) => w.dataset.id),
  aggregates,
  viewport: window.innerWidth,
  page_width: document.documentElement.scrollWidth,
  // CSS pixels per SVG unit: 1 means the drawing's text is shown at its own size.
  scale: svg.getBoundingClientRect().width / box.width,
  text_outside: texts.filter((b) => b.x < -1 || b.x + b.width > box.width + 1).length,
  live: workers.filter((w) => w.dataset.state === "live").length,
  left: workers.filter((w) => w.dataset.state === "left").length,
  peers: document.querySelectorAll("#topology .node.bootstrap").length,
  coordinators: document.querySelectorAll("#topology path.coordinator").length,
  figures,
  status: document.getElementById("status-text").textContent,
};
"""


@pytest.fixture
def browser_binaries() -> BrowserBinaries:
    """Chromium and chromedriver, or a skip (a failure in CI)."""
    return require_browser()


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    """What a test opens, closed when it ends (last opened first)."""
    async with AsyncExitStack() as stack:
        yield stack


def network() -> tuple[list[WorkerRecord], list[WorkerRecord], set[str]]:
    """The 20 workers' records, the tombstones of those that leave, the ids of DHT servers."""
    records: list[WorkerRecord] = []
    tombstones: list[WorkerRecord] = []
    servers: set[str] = set()
    for i, services in enumerate(SERVICE_SETS):
        identity = Identity.generate()
        server = i % 4 == 0  # five reachable DHT servers, the rest in client mode
        dht: dict[str, Any] = {"dht_host": "127.0.0.1", "dht_port": 5000 + i} if server else {}
        record = make_record(
            identity,
            services=services,
            region=REGIONS[i % 2],
            load=round((i * 7 % 20) / 20, 2),
            seq=10 + i,
            **dht,
        )
        records.append(record)
        if server:
            servers.add(record.worker_id)
        if i in LEAVING:
            tombstones.append(tombstone_for(identity, record, now=time.time()))
    return records, tombstones, servers


async def test_page_draws_every_worker_and_the_figures(
    browser_binaries: BrowserBinaries,
    registry: Registry,
    stack: AsyncExitStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records, tombstones, servers = network()
    for record in [*records, *tombstones]:
        assert await registry.upsert(record)
    config = RouterConfig(
        admin_token=ADMIN_TOKEN,
        coordinators=(COORDINATOR,),
        cache=CacheSettings(ttl=300),  # the hit rate below must not depend on the machine's pace
    )
    app = create_app(config, registry=registry, listen_events=False)
    await stack.enter_async_context(app.router.lifespan_context(app))
    base = await stack.enter_async_context(serve(app))
    client = await stack.enter_async_context(httpx.AsyncClient(base_url=base, trust_env=False))
    for _ in range(4):  # one miss, then three hits: 75%
        assert (await client.get("/services/ocr")).status_code == 200
    topology = (await client.get("/topology")).json()
    shown = {w["worker_id"]: w["state"] for w in topology["workers"]}
    assert sorted(shown.values()).count("left") == len(LEAVING)
    assert len(shown) == len(records)

    browser = await stack.enter_async_context(chromium(browser_binaries, tmp_path / "chromium"))
    await browser.get(f"{base}/?refresh=0.5")
    seen: dict[str, Any] = {}

    async def drawn(count: int) -> bool:
        seen.update(await browser.run(READ_PAGE))
        return seen["state"] == "ready" and len(seen["ids"]) == count

    await wait_for(
        lambda: drawn(len(shown)),
        timeout=DRAW_TIMEOUT,
        interval=0.1,
        message=f"{len(shown)} drawn workers (last seen: {seen})",
    )
    await browser.screenshot(SCREENSHOT)

    assert sorted(seen["ids"]) == sorted(shown)  # each worker drawn once, tombstones included
    assert seen["live"] == len(records) - len(LEAVING)
    assert seen["left"] == len(LEAVING)
    # The coordinator and every live DHT server are handed out as bootstrap peers (fewer than 8).
    assert seen["coordinators"] == 1
    assert seen["peers"] == len(servers)
    figures = seen["figures"]
    assert figures["workers"]["value"] == str(len(records) - len(LEAVING))
    assert figures["workers"]["detail"].startswith(f"{len(LEAVING)} left")
    assert figures["services"]["value"] == "3"
    assert figures["services"]["detail"] == "ocr 9 · gpu 7 · embed 4"
    assert figures["cache"]["value"] == "75%"
    assert figures["cache"]["detail"] == "3 hits · 1 misses · 0 stale"
    # The four lookups above; the page's own requests are the operator's, never the edge's.
    assert figures["edge"]["value"] == "4"
    assert "of 100,000 a day" in figures["edge"]["detail"]
    assert not figures["workers"]["clipped"]
    # No bridge in the router's process: the card says where the lag is instead of "n/a".
    assert figures["bridge"]["value"] == NO_VALUE
    assert "own process" in figures["bridge"]["detail"]
    assert figures["backends"]["value"] == "0"
    assert seen["status"].startswith("live")

    # The page refreshes by itself: a worker that joins now appears without a reload.
    renders, before = seen["renders"], figures["workers"]["value"]
    newcomer = make_record(services=["embed"], region="ap-south", load=0.5)
    assert await registry.upsert(newcomer)
    await wait_for(
        lambda: drawn(len(shown) + 1),
        timeout=DRAW_TIMEOUT,
        interval=0.1,
        message=f"the newcomer drawn (last seen: {seen})",
    )
    assert newcomer.worker_id in seen["ids"]
    assert seen["renders"] > renders
    assert seen["figures"]["workers"]["value"] == str(int(before) + 1)
    assert seen["figures"]["edge"]["value"] == "4"
    counted = app.state.rma.metrics.requests
    assert {klass for klass, _ in counted} <= {"lookup", "topology"}, counted

    # Once the router carries the bridge's figures, the page shows them instead of "n/a".
    real_figures = handlers.figures
    monkeypatch.setattr(
        handlers,
        "figures",
        lambda state: {
            **real_figures(state),
            "bridge_sync_lag_seconds": 2.5,
            "bridge_journal_records": 3,
        },
    )

    async def bridge_shown() -> bool:
        seen.update(await browser.run(READ_PAGE))
        return bool(seen["figures"]["bridge"]["value"] == "2.5 s")

    await wait_for(bridge_shown, timeout=DRAW_TIMEOUT, interval=0.1, message="the bridge lag")
    assert seen["figures"]["bridge"]["detail"] == "journal 3 records"


async def test_page_at_2000_workers_on_a_desktop_and_a_phone(
    browser_binaries: BrowserBinaries,
    registry: Registry,
    stack: AsyncExitStack,
    tmp_path: Path,
) -> None:
    network = fleet(BIG)
    await store(registry, network.records)
    config = RouterConfig(admin_token=ADMIN_TOKEN, coordinators=(COORDINATOR,))
    app = create_app(config, registry=registry, listen_events=False)
    await stack.enter_async_context(app.router.lifespan_context(app))
    base = await stack.enter_async_context(serve(app))
    browser = await stack.enter_async_context(chromium(browser_binaries, tmp_path / "chromium"))
    await browser.set_window(*DESKTOP)
    await browser.get(f"{base}/?refresh=0.5")
    seen: dict[str, Any] = {}

    async def all_shown(after: int = 0) -> bool:
        """Every worker drawn or counted in an aggregate, in a render after `after`."""
        seen.update(await browser.run(READ_PAGE))
        shown = len(seen["ids"]) + sum(a["count"] for a in seen["aggregates"])
        return bool(seen["state"] == "ready" and seen["renders"] > after and shown == BIG)

    await wait_for(
        all_shown,
        timeout=BIG_DRAW_TIMEOUT,
        interval=0.25,
        message=f"{BIG} workers shown (last seen: {summary(seen)})",
    )
    await browser.screenshot(ARTIFACTS / "topology-2000.png")
    check_big_page(seen, network)
    # The cell that holds 30% of the network is more than a cell can draw: it aggregates, and
    # its histogram accounts for each of its live workers.
    group, region = "+".join(BIG_CELL[0]), BIG_CELL[1]
    (big,) = [a for a in seen["aggregates"] if (a["group"], a["region"]) == (group, region)]
    assert big["count"] == network.cells[(group, region)]
    assert big["bars"] == big["live"] == big["count"] - big["left"]
    assert len(seen["ids"]) == len(set(seen["ids"]))  # each drawn worker drawn once
    assert seen["scale"] == pytest.approx(1.0, abs=0.02)

    # A phone: the page lays itself out again for 390 px, with nothing wider than the screen.
    renders = seen["renders"]
    await browser.set_window(*PHONE)
    await wait_for(
        lambda: all_shown(after=renders),
        timeout=BIG_DRAW_TIMEOUT,
        interval=0.25,
        message=f"a redraw at phone width (last seen: {summary(seen)})",
    )
    await browser.screenshot(ARTIFACTS / "topology-2000-phone.png")
    assert seen["viewport"] <= PHONE[0]
    assert seen["page_width"] <= seen["viewport"]
    # One SVG unit to one CSS pixel: the drawing's 11 px captions stay 11 px, not a third of it.
    assert seen["scale"] == pytest.approx(1.0, abs=0.02)
    assert seen["text_outside"] == 0
    check_big_page(seen, network)

    # Rounds of polling by two layouts, and not one request in the edge budget.
    assert seen["renders"] >= 2
    assert seen["figures"]["edge"]["value"] == "0"
    counted = app.state.rma.metrics.requests
    assert {klass for klass, _ in counted} == {"topology"}, counted


def check_big_page(seen: dict[str, Any], network: Any) -> None:
    """The figures of the 2,000-worker page: counts that add up and text that is not cut off."""
    figures = seen["figures"]
    assert figures["workers"]["value"] == f"{network.live:,}"
    assert figures["workers"]["detail"] == (
        f"{network.left} left · {network.servers} DHT servers · "
        f"{network.live - network.servers:,} clients"
    )
    assert not figures["workers"]["clipped"]
    ranked = sorted(network.services.items(), key=lambda item: (-item[1], item[0]))
    assert figures["services"]["value"] == str(len(ranked))
    assert figures["services"]["detail"] == " · ".join(f"{name} {n:,}" for name, n in ranked)
    assert not any(f["clipped"] for name, f in figures.items() if name != "services")
    assert sum(a["left"] for a in seen["aggregates"]) <= network.left


def summary(seen: dict[str, Any]) -> dict[str, Any]:
    """What the page showed, without the 2,000 ids."""
    return {key: value for key, value in seen.items() if key != "ids"} | {
        "drawn": len(seen.get("ids", []))
    }
