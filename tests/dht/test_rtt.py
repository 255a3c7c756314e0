"""The round-trip estimator behind a lookup's stall time, and a node measuring its own."""

from __future__ import annotations

import asyncio

import pytest

from dht_bridge.dht import shards
from dht_bridge.dht.rtt import RoundTrips
from dht_bridge.dht.storage import StoreResult
from dht_bridge.dht.values import encode_value, key_digest
from dht_bridge.errors import ConfigError
from dht_bridge.settings import DHTSettings
from tests.support.dht import NetworkFactory
from tests.support.helpers import make_record


def test_no_reply_seen_means_the_ceiling() -> None:
    assert RoundTrips().stall(0.02, 0.1) == 0.1


def test_steady_fast_replies_bring_the_stall_down_to_the_floor() -> None:
    rtt = RoundTrips()
    for _ in range(50):
        rtt.observe(0.001)
    assert rtt.stall(0.02, 0.1) == 0.02
    assert rtt.stall(0.0001, 0.1) == pytest.approx(0.001, rel=0.5)


def test_jittery_or_slow_replies_push_it_up_to_the_ceiling() -> None:
    rtt = RoundTrips()
    for sample in [0.001, 0.030, 0.002, 0.040] * 10:
        rtt.observe(sample)
    assert 0.05 < rtt.stall(0.02, 1.0) < 1.0
    slow = RoundTrips()
    for _ in range(20):
        slow.observe(0.3)  # an intercontinental network: never below what it takes
    assert slow.stall(0.02, 0.1) == 0.1


def test_one_late_reply_after_a_calm_spell_widens_the_window_at_once() -> None:
    rtt = RoundTrips()
    for _ in range(50):
        rtt.observe(0.001)
    before = rtt.stall(0.0001, 1.0)
    rtt.observe(0.2)  # a loop stalled by a GC or a busy disk
    assert rtt.stall(0.0001, 1.0) > 10 * before


def test_the_floor_cannot_exceed_the_ceiling() -> None:
    with pytest.raises(ConfigError, match="stall_floor"):
        DHTSettings(stall=0.1, stall_floor=0.2)
    with pytest.raises(ConfigError, match="stall_floor"):
        DHTSettings(stall_floor=0)


async def test_a_node_learns_its_round_trips_from_its_own_lookups(
    network_factory: NetworkFactory,
) -> None:
    nodes = await network_factory(8)
    reader = nodes[-1]
    await reader.get_records("worker:" + "0" * 40)
    assert reader.rpc.round_trips.samples > 0
    # Loopback answers in well under the floor unless the machine is very busy.
    settings = reader.settings
    assert reader.stall == reader.rpc.round_trips.stall(settings.stall_floor, settings.stall)
    assert settings.stall_floor <= reader.stall <= settings.stall


async def test_a_value_held_only_by_a_slow_contact_is_still_found(
    network_factory: NetworkFactory,
) -> None:
    # The reader's stall adapts to loopback (a few ms): the one holder answers in 90 ms, later
    # than that, but a value lookup that has found nothing waits for it up to the ceiling.
    settings = DHTSettings(host="127.0.0.1", port=0, rpc_timeout=1.0, stall=0.5, stall_floor=0.01)
    nodes = await network_factory(8, settings=settings)
    reader, holder = nodes[0], nodes[5]
    for _ in range(5):
        await reader.get_records("worker:" + "0" * 40)  # replies teach it the round trip
    assert reader.stall < 0.09
    record = make_record()
    key = shards.worker_key(record.worker_id)
    digest = key_digest(key)
    assert holder.storage.merge(digest, encode_value(key, [record])) is StoreResult.OK
    loop = asyncio.get_running_loop()
    answer = holder.rpc.datagram_received

    def slowly(data: bytes, addr: tuple[str, int]) -> None:
        loop.call_later(0.09, answer, data, addr)

    holder.rpc.datagram_received = slowly  # type: ignore[method-assign]
    found = await reader.get_record(record.worker_id)
    assert found is not None
    assert found.signature == record.signature
