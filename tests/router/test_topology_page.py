"""The topology page through the ASGI app: `/` and its assets come from the router itself, and
`/topology` still carries every field the page's script reads."""

from __future__ import annotations

import re

from dht_bridge.registry.registry import Registry
from edge_router.page import STATIC_DIR
from tests.support.helpers import make_record
from tests.support.router import client_for, router_app

# The only URL-looking text allowed in the assets: an XML namespace name, which nothing fetches.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
EXTERNAL = re.compile(r"""(?:[a-z][a-z0-9+.-]*:)?//[^\s"'()<>]+|@import|url\(""", re.IGNORECASE)
REFERENCE = re.compile(r"""\b(?:src|href)="([^"]*)\"""")

# What topology.js reads from GET /topology.
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
    assert {"workers", "services", "regions", "coordinators", "figures"} <= set(body)
    (worker,) = body["workers"]
    assert set(worker) >= WORKER_FIELDS
    assert worker["state"] == "live"
    assert set(body["figures"]) >= FIGURES_READ
