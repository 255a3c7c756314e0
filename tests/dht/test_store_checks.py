"""What the signature checks of STOREd records may cost a node: validly signed records are free
to replay, and one host cycling more of its own than the verifier remembers made every record
of every STORE a check. The same record again costs none, and each sender's IP group has a
budget of checks; coordinators are not metered."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from kademlia.node import Node

from dht_bridge.dht import shards
from dht_bridge.dht.admission import TokenBuckets
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.storage import UNPROVEN, RecordStorage, StoreResult
from dht_bridge.dht.values import RecordVerifier, encode_value, key_digest
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord
from tests.support.dht import ManualClock, start_node
from tests.support.helpers import POLICY, make_record
from tests.support.raw_peer import RawPeer, open_raw_peer

SERVICES = tuple(f"s{i}" for i in range(4))
PER_STORE = 30  # records a STORE, about 7 KB


def shard_value(service: str, records: list[WorkerRecord]) -> tuple[bytes, bytes]:
    key = shards.service_key(service, 0)
    return key_digest(key), encode_value(key, records)


def fresh(count: int) -> list[WorkerRecord]:
    return [make_record(services=SERVICES, ttl=3000) for _ in range(count)]


def test_the_record_held_already_costs_no_check_when_the_verifier_forgot_it() -> None:
    held = RecordStorage(POLICY, verifier=RecordVerifier(POLICY, maxsize=2))
    identities = [Identity.generate() for _ in range(6)]
    records = [make_record(identity, services=SERVICES, ttl=3000) for identity in identities]
    value = shard_value("s0", records)
    assert held.merge(*value, source=UNPROVEN) is StoreResult.OK
    assert held.verifier.misses == 6
    assert held.merge(*shard_value("s1", fresh(3))) is StoreResult.OK  # the verifier forgets
    # The same records again: nothing to check, nothing changed.
    assert held.merge(*value, source=UNPROVEN) is StoreResult.STALE
    assert held.verifier.misses == 9
    # A newer record of one of them is checked, and only it.
    newer = make_record(identities[0], services=SERVICES, ttl=3000, seq=2)
    assert held.merge(*shard_value("s0", [*records, newer]), source=UNPROVEN) is StoreResult.OK
    assert held.verifier.misses == 10


def test_each_ip_group_has_a_budget_of_checks_and_over_it_nothing_is_checked() -> None:
    clock = ManualClock()
    held = RecordStorage(POLICY)
    held.checks = TokenBuckets(rate=10, burst=25, clock=clock)
    flooder, other = ("198.51.100.7", "198.51.100.0/24"), ("203.0.113.9", "203.0.113.0/24")
    assert held.merge(*shard_value("s0", fresh(20)), source=flooder) is StoreResult.OK
    # 20 of its 25 checks spent: a value of 10 more is refused whole, none of them checked.
    assert held.merge(*shard_value("s1", fresh(10)), source=flooder) is StoreResult.INVALID
    assert (held.verifier.misses, held.refused_checks) == (20, 1)
    # Others, our own node and unmetered senders (coordinators) are not held back by it.
    assert held.merge(*shard_value("s1", fresh(10)), source=other) is StoreResult.OK
    assert held.merge(*shard_value("s2", fresh(10))) is StoreResult.OK
    assert held.merge(*shard_value("s3", fresh(10)), source=flooder, metered=False) is (
        StoreResult.OK
    )
    # The budget fills again with time.
    clock.advance(1.0)
    assert held.merge(*shard_value("s0", fresh(10)), source=flooder) is StoreResult.OK
    assert held.verifier.misses == 60


@dataclass
class Wire:
    victim: DHTNode
    peer: RawPeer
    peer_id: bytes

    async def store(self, service: str, records: list[WorkerRecord]) -> Any:
        return await self.peer.ask(
            self.victim.address, "store", self.peer_id, *shard_value(service, records)
        )


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    victim = await start_node()
    peer_id = os.urandom(20)

    def answer(sender: tuple[str, int], name: str, args: list[Any]) -> Any:
        return peer_id if name == "ping" else None

    transport, peer = await open_raw_peer(answer)
    try:
        # The peer's address answers us: its STOREs count against its own group.
        ok, _ = await victim.rpc.call_ping(Node(peer_id, *peer.address))
        assert ok
        yield Wire(victim, peer, peer_id)
    finally:
        transport.close()
        await victim.aclose()


async def test_a_host_replaying_signed_records_gets_only_its_budget_of_checks(wire: Wire) -> None:
    clock = ManualClock()
    burst = 2 * PER_STORE + PER_STORE // 2
    wire.victim.storage.checks = TokenBuckets(rate=PER_STORE, burst=burst, clock=clock)
    records = fresh(5 * PER_STORE)
    batches = [records[i : i + PER_STORE] for i in range(0, len(records), PER_STORE)]
    # The budget's clock stands still: no refill while they arrive, however slow the machine.
    answers = [await wire.store(SERVICES[n % 4], batch) for n, batch in enumerate(batches)]
    assert answers == ["ok", "ok", "invalid", "invalid", "invalid"]
    assert wire.victim.verifier.misses == 2 * PER_STORE
    clock.advance(1.0)  # a second's worth: one more STORE's checks
    assert await wire.store(SERVICES[2], batches[2]) == "ok"
    assert await wire.store(SERVICES[3], batches[3]) == "invalid"
    assert wire.victim.verifier.misses == 3 * PER_STORE


async def test_a_coordinators_stores_are_not_metered(wire: Wire) -> None:
    wire.victim.storage.checks = TokenBuckets(rate=1, burst=1, clock=ManualClock())
    wire.victim.set_coordinators([wire.peer.address])
    answers = [await wire.store(SERVICES[n], fresh(PER_STORE)) for n in range(3)]
    assert answers == ["ok"] * 3
    assert wire.victim.verifier.misses == 3 * PER_STORE
