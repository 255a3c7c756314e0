"""POST /workers refuses a tunnel URL that is not in canonical form, saying why (issue 20.5)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from tests.support.helpers import POLICY, make_record
from tests.support.router import client_for, router_app


@pytest.fixture
async def embedded() -> AsyncIterator[Registry]:
    """The in-process registry: these tests are about what the router lets in."""
    registry = open_registry(RegistrySettings(), policy=POLICY)
    try:
        yield registry
    finally:
        await registry.aclose()


@pytest.mark.parametrize(
    ("tunnel_url", "reason"),
    [
        ("https://127.0.0.1\\.trycloudflare.com/", "backslash"),
        ("https://w\t.trycloudflare.com/", "whitespace or a control character ('\\t' at 9)"),
        (" https://w.trycloudflare.com", "whitespace or a control character (' ' at 0)"),
        ("https://%31%32%37.0.0.1.trycloudflare.com/", "percent escape"),
        ("https://w.trycloudflare.com@127.0.0.1/", "user info"),
        ("https://w.trycloudflare.com./", "end with a dot"),
        ("https://W.TryCloudflare.com", "canonical form (that is 'https://w.trycloudflare.com')"),
        (
            "https://b\u00fccher.trycloudflare.com",
            "canonical form (that is 'https://xn--bcher-kva.trycloudflare.com')",
        ),
    ],
)
async def test_post_workers_answers_422_naming_the_problem(
    embedded: Registry, tunnel_url: str, reason: str
) -> None:
    record = make_record(tunnel_url=tunnel_url)
    async with client_for(router_app(embedded)) as client:
        answer = await client.post("/workers", json=record.to_dict())
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"] == "invalid_record"
        detail = answer.json()["detail"]
        assert detail.startswith("tunnel_url: ")
        assert reason in detail
        listed = await client.get("/services/ocr")
    assert listed.json()["providers"] == []
    assert await embedded.get(record.worker_id) is None


async def test_the_canonical_form_is_accepted(embedded: Registry) -> None:
    record = make_record(tunnel_url="https://xn--bcher-kva.trycloudflare.com")
    async with client_for(router_app(embedded)) as client:
        answer = await client.post("/workers", json=record.to_dict())
        assert answer.status_code == 200, answer.text
        listed = await client.get("/services/ocr")
    [provider] = listed.json()["providers"]
    assert provider["tunnel_url"] == "https://xn--bcher-kva.trycloudflare.com"
