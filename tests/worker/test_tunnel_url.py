"""The agent signs the canonical form of the tunnel URL it was given (issue 20.5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dht_bridge.errors import ConfigError
from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import RegistrySettings
from edge_router.config import RouterConfig
from tests.support.helpers import POLICY
from tests.support.worker import running_edge, worker_config


async def test_the_agent_signs_the_canonical_form_of_what_it_was_given(tmp_path: Path) -> None:
    registry = open_registry(RegistrySettings(), policy=POLICY)
    config = worker_config(
        tmp_path, "w-up", tunnel_url="HTTPS://W-Up.TryCloudflare.com:443/", edge_only=True
    )
    try:
        async with running_edge(registry, RouterConfig()) as edge:
            agent = edge.agent(config)
            try:
                await agent.start()
                assert agent.record is not None
                assert agent.record.tunnel_url == "https://w-up.trycloudflare.com"
                stored = await registry.get(agent.worker_id)
                assert stored is not None
                assert stored.tunnel_url == "https://w-up.trycloudflare.com"
            finally:
                await agent.aclose()
    finally:
        await registry.aclose()


@pytest.mark.parametrize(
    ("tunnel_url", "reason"),
    [
        ("https://127.0.0.1\\.trycloudflare.com/", "backslash"),
        ("https://w-up.trycloudflare.com\n", "control character"),
        ("https://w-up.trycloudflare.com./", "dot"),
    ],
)
def test_a_url_that_cannot_be_made_canonical_stops_the_start(
    tmp_path: Path, tunnel_url: str, reason: str
) -> None:
    with pytest.raises(ConfigError, match=f"--tunnel-url .*{reason}"):
        worker_config(tmp_path, "w", tunnel_url=tunnel_url)
