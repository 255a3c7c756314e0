"""The topology page through the ASGI app: `/` and its assets come from the router itself, and
`/topology` still carries every field the page's script reads."""

from __future__ import annotations

import logging
import re

import pytest

from dht_bridge.registry.registry import Registry
from edge_router.config import RouterConfig
from edge_router.page import STATIC_DIR, PagePollFilter, quiet_page_polls
from tests.support.helpers import make_record
from tests.support.router import ADMIN_TOKEN, client_for, router_app

# The only URL-looking text allowed in the assets: an XML namespace name, which nothing fetches.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
EXTERNAL = re.compile(r"""(?:[a-z][a-z0-9+.-]*:)?//[^\s"'()<>]+|@import|url\(""", re.IGNORECASE)
REFERENCE = re.compile(r"""\b(?:src|href)="([^"]*)\"""")

# What topology.js reads from GET /topology.
TOPOLOGY_FIELDS = {"workers", "services", "regions", "coordinators", "bootstrap_peers", "figures"}
WORKER_FIELDS = {"worker_id", "services", "region", "load", "seq", "state", "dht", "expires_in"}
FIGURES_READ = {
    "cache_hits",
    "cache_misses",
    "cache_stale",
    "cache_hit_ratio",
    "edge_requests_today",
    "edge_daily_budget",
    "registry_failures",
    "dht_reads",
    "events_connected",
}


def external_urls(text: str) -> list[str]:
    """URL-like references to somewhere else than this origin (the SVG namespace excepted)."""
    return [m for m in EXTERNAL.findall(text.replace(SVG_NAMESPACE, "")) if m]


async def test_page_and_its_assets_come_from_the_router_and_nothing_else(
    registry: Registry,
) -> None:
    async with client_for(router_app(registry)) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy
        assert "connect-src 'self'" in policy
        refs = REFERENCE.findall(page.text)
        assert {"/static/topology.js", "/static/topology.css", "/static/favicon.svg"} <= set(refs)
        assert external_urls(page.text) == []
        for ref in refs:
            assert ref.startswith("/")
            assert not ref.startswith("//")
            answer = await client.get(ref)
            assert answer.status_code == 200, ref
            assert external_urls(answer.text) == [], ref
        script = await client.get("/static/topology.js")
        assert "javascript" in script.headers["content-type"]
        assert "/topology" in script.text
        style = await client.get("/static/topology.css")
        assert style.headers["content-type"].startswith("text/css")
        head = await client.head("/")
        assert head.status_code == 200
        missing = await client.get("/static/nothing-here.js")
        assert missing.status_code == 404
        assert missing.json()["error"] == "not_found"


async def test_every_served_asset_is_in_the_package_folder() -> None:
    names = {path.name for path in STATIC_DIR.iterdir()}
    assert {"topology.html", "topology.js", "topology.css", "favicon.svg"} <= names
    for path in STATIC_DIR.iterdir():
        assert external_urls(path.read_text(encoding="utf-8")) == [], path.name


async def test_topology_json_has_what_the_page_reads(registry: Registry) -> None:
    await registry.upsert(make_record(services=["ocr"], region="eu-west", load=0.25))
    async with client_for(router_app(registry)) as client:
        body = (await client.get("/topology")).json()
    assert set(body) >= TOPOLOGY_FIELDS
    (worker,) = body["workers"]
    assert set(worker) >= WORKER_FIELDS
    assert worker["state"] == "live"
    assert set(body["figures"]) >= FIGURES_READ


async def test_topology_carries_the_bootstrap_peers_and_nothing_the_page_asks_is_counted(
    registry: Registry,
) -> None:
    server = make_record(services=["ocr"], region="eu-west", dht_host="127.0.0.1", dht_port=5001)
    await registry.upsert(server)
    await registry.upsert(make_record(services=["gpu"], region="us-east"))  # a DHT client
    config = RouterConfig(admin_token=ADMIN_TOKEN, coordinators=(("127.0.0.1", 4000),))
    app = router_app(registry, config=config)
    async with client_for(app) as client:
        for path in ("/", "/static/topology.js", "/static/topology.css", "/topology"):
            assert (await client.get(path)).status_code == 200, path
        body = (await client.get("/topology")).json()
        metrics = app.state.rma.metrics
        assert metrics.edge_requests_today == 0
        assert body["figures"]["edge_requests_today"] == 0
        # The same peers a joining worker is handed (that request is the edge's: counted).
        handed = (await client.get("/dht/bootstrap")).json()["peers"]
        assert metrics.edge_requests_today == 1
    assert body["bootstrap_peers"] == handed
    assert [(p["host"], p["port"]) for p in handed] == [("127.0.0.1", 4000), ("127.0.0.1", 5001)]


def test_the_script_polls_topology_only() -> None:
    # The browser test sees this at run time; this holds where no browser is installed.
    script = (STATIC_DIR / "topology.js").read_text(encoding="utf-8")
    assert re.findall(r"await getJSON\(([^)]*)\)", script) == ['"/topology"']
    assert script.count("fetch(") == 1
    assert "/dht/bootstrap" not in script


def access_line(method: str, target: str, status: int) -> logging.LogRecord:
    """An access record as uvicorn's h11 protocol logs it (client, method, path?query, HTTP
    version, status)."""
    return logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:50000", method, target, "1.1", status),
        None,
    )


@pytest.mark.parametrize(
    ("method", "target", "status", "logged"),
    [
        ("GET", "/topology", 200, False),
        ("GET", "/", 200, False),
        ("HEAD", "/", 200, False),
        ("GET", "/?refresh=0.5", 200, False),
        ("GET", "/static/topology.js", 304, False),
        ("GET", "/topology", 503, True),  # a failing page is worth a line
        ("GET", "/static/nothing.js", 404, True),
        ("GET", "/services/ocr", 200, True),
        ("GET", "/dht/bootstrap", 200, True),
        ("POST", "/topology", 405, True),
        ("GET", "/topology-x", 200, True),
    ],
)
def test_access_lines_of_the_page_polls_are_dropped(
    method: str, target: str, status: int, logged: bool
) -> None:
    assert PagePollFilter().filter(access_line(method, target, status)) is logged


def test_quiet_page_polls_filters_the_access_logger_while_it_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    access = logging.getLogger("uvicorn.access")
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    with quiet_page_polls():
        access.handle(access_line("GET", "/topology", 200))
        access.handle(access_line("GET", "/services/ocr", 200))
    access.handle(access_line("GET", "/topology", 200))
    assert [r.args[2] for r in caplog.records if isinstance(r.args, tuple)] == [
        "/services/ocr",
        "/topology",
    ]
    assert access.filters == []
