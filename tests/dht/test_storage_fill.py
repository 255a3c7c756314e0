"""Filling a node's storage with signed records of fresh identities (which cost nothing): once
half the keys are taken, each sender adds new keys only within its quota, and senders whose
address never answered us share one. The flood keeps at most its half; workers still file."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

from dht_bridge.dht import shards, storage
from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.storage import RecordStorage, StoreResult
from dht_bridge.dht.values import encode_value, key_digest
from dht_bridge.records import WorkerRecord
from tests.support.dht import TEST_SETTINGS, stop_all
from tests.support.helpers import POLICY, make_record
from tests.support.raw_peer import RawPeer, open_raw_peer

MAX_KEYS = 200
FLOOD = 300


def store_args(record: WorkerRecord) -> tuple[bytes, bytes]:
    key = shards.worker_key(record.worker_id)
    return key_digest(key), encode_value(key, [record])


def test_quotas_share_the_last_half_of_the_keys() -> None:
    held = RecordStorage(POLICY, max_keys=100)
    flooder, other = ("198.51.100.7", "198.51.100.0/24"), ("203.0.113.9", "203.0.113.0/24")
    pool = storage.UNPROVEN

    def store(source: Any) -> StoreResult:
        return held.merge(*store_args(make_record()), source=source)

    # The first half is anyone's; then the flooder is far over its 2 keys (2% of 100).
    assert [store(flooder) for _ in range(50)] == [StoreResult.OK] * 50
    assert store(flooder) is StoreResult.FULL
    # Another address of the same /24 shares the subnet's 10 (also far over).
    assert store(("198.51.100.8", "198.51.100.0/24")) is StoreResult.FULL
    # A newcomer elsewhere gets its 2, unproved senders their pool's 10, our own node no limit.
    assert [store(other) for _ in range(3)] == [StoreResult.OK] * 2 + [StoreResult.FULL]
    assert [store(pool) for _ in range(11)] == [StoreResult.OK] * 10 + [StoreResult.FULL]
    assert store(None) is StoreResult.OK
    assert held.refused_quota == 4
    assert len(held) == 63


def _answers_checks(sender: tuple[str, int], name: str, args: list[Any]) -> Any:
    return os.urandom(20) if name == "ping" else list(sender) if name == "stun" else None


@pytest.mark.parametrize("answers_checks", [True, False], ids=["proved", "forged-source"])
async def test_a_flood_of_fresh_identities_leaves_room_for_workers(answers_checks: bool) -> None:
    victim = DHTNode(TEST_SETTINGS, policy=POLICY, storage=RecordStorage(POLICY, max_keys=MAX_KEYS))
    await victim.listen()
    worker = DHTNode(TEST_SETTINGS, policy=POLICY)
    await worker.listen()
    transport, flooder = await open_raw_peer(_answers_checks if answers_checks else None)
    try:
        replies = [await _store(flooder, victim, make_record()) for _ in range(FLOOD)]
        kept = replies.count("ok")
        # The first half of the keys, and (once its address is proved) not one more.
        assert MAX_KEYS // 2 <= kept <= MAX_KEYS // 2 + 1
        assert replies[-1] == "full"
        if answers_checks:
            assert flooder.address in victim.rpc.validated

        # Workers keep filing their keys there.
        await worker.bootstrap([victim.address])
        contact = next(c for c in worker.rpc.router.contacts() if c.port == victim.address[1])
        for record in (make_record() for _ in range(4)):  # its quota: 2% of the keys
            ok, answer = await worker.rpc.call_store(contact, *store_args(record))
            assert (ok, answer) == (True, "ok")
        assert victim.storage.refused_quota == FLOOD - kept
    finally:
        transport.close()
        await stop_all([victim, worker])


async def _store(peer: RawPeer, node: DHTNode, record: WorkerRecord) -> Any:
    return await peer.ask(node.address, "store", os.urandom(20), *store_args(record))


def test_a_forged_record_refuses_the_whole_stored_value_after_one_check() -> None:
    held = RecordStorage(POLICY)
    key = shards.service_key("ocr", 0)
    honest = make_record(services=("ocr",))
    forged = [dataclasses.replace(make_record(services=("ocr",)), load=0.5) for _ in range(14)]
    # Each check costs about 0.35 ms: a value of forged records was a check per record.
    assert held.merge(key_digest(key), encode_value(key, [honest, *forged])) is (
        StoreResult.INVALID
    )
    assert held.verifier.misses == 2  # the honest record, then the first forged one
    assert held.records(key_digest(key)) == []
    assert held.merge(key_digest(key), encode_value(key, [honest])) is StoreResult.OK
