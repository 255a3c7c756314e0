"""A hostile holder against a publisher's recheck of a key's holders (on real UDP sockets on
127.0.0.1): once the holder cache lapses, the holders are asked whom they know near the key,
and one socket that became a holder named 20 ids next to the key at its own address."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kademlia.node import Node

from dht_bridge.dht import publish, shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.values import key_digest
from tests.support.dht import TEST_SETTINGS, start_network, stop_all
from tests.support.helpers import make_record
from tests.support.raw_peer import RawPeer, open_raw_peer

Address = tuple[str, int]
# Every publish finds its holders' time up, so every one rechecks them.
LAPSED = dataclasses.replace(TEST_SETTINGS, holder_cache_ttl=1e-6)
RECORD = make_record(services=("ocr",), ttl=3000)
DIGEST = key_digest(shards.worker_key(RECORD.worker_id))
KEY = int.from_bytes(DIGEST, "big")
HOSTILE_ID = (KEY ^ 1).to_bytes(20, "big")
FAKES = [(KEY ^ (2 + i)).to_bytes(20, "big") for i in range(20)]


@dataclasses.dataclass
class Scene:
    nodes: list[DHTNode]
    publisher: DHTNode
    peer: RawPeer
    poison: bool = False

    def holders(self) -> list[Node]:
        return self.publisher.publisher._holder_cache[DIGEST][1]

    def at_hostile(self) -> list[Node]:
        return [n for n in self.holders() if (n.ip, n.port) == self.peer.address]


@pytest.fixture
async def scene(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Scene]:
    # Every holder is asked at each recheck, the hostile one too (two are picked at random).
    monkeypatch.setattr(publish, "RECHECK_ASKS", LAPSED.replicas)
    nodes = await start_network(12, settings=LAPSED)
    box: list[Scene] = []

    def answer(sender: Address, name: str, args: list[Any]) -> Any:
        if name == "ping":
            return HOSTILE_ID
        if name in ("store", "renew"):
            return "ok"
        if name in ("find_node", "find_value"):
            if box[0].poison and args[1] == DIGEST:
                return [(fake, *box[0].peer.address) for fake in FAKES]
            return []
        return None

    transport, peer = await open_raw_peer(answer)
    publisher = nodes[-1]
    box.append(Scene(nodes, publisher, peer))
    # One honest-looking contact next to the key: it becomes one of its holders.
    publisher.rpc.router.add_contact(Node(HOSTILE_ID, *peer.address))
    try:
        yield box[0]
    finally:
        transport.close()
        await stop_all(nodes)


async def test_a_holder_naming_ids_at_its_own_address_gets_no_more_places(scene: Scene) -> None:
    await scene.publisher.publish(RECORD)
    assert [n.id for n in scene.at_hostile()] == [HOSTILE_ID]
    scene.poison = True
    for _ in range(4):
        await scene.publisher.publish(RECORD)
        # The fakes sit at one address: they take at most a bucket's share of the places.
        assert HOSTILE_ID in [n.id for n in scene.at_hostile()]
        assert len(scene.at_hostile()) <= scene.publisher.rpc.router.limits.per_ip_bucket
        assert len(scene.holders()) == LAPSED.replicas


async def test_fakes_that_answer_pings_still_take_at_most_a_buckets_share(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    await scene.publisher.publish(RECORD)
    scene.poison = True

    async def answered(node: Node) -> tuple[bool, Any]:
        return True, node.id  # as if each fake answered under its own id

    monkeypatch.setattr(scene.publisher.rpc, "call_ping", answered)
    for _ in range(4):
        await scene.publisher.publish(RECORD)
        holders = scene.holders()
        assert len(holders) == LAPSED.replicas
        assert len(scene.at_hostile()) == scene.publisher.rpc.router.limits.per_ip_bucket
