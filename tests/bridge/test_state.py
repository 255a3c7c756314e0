"""What the bridge keeps in memory between rounds: records waiting to be published are
forgotten once their lease ends, so a long DHT outage does not grow the bridge without bound."""

from __future__ import annotations

import random

from dht_bridge.bridge.state import BridgeSettings, BridgeState
from tests.support.helpers import ManualClock, make_record


def test_records_waiting_for_the_dht_are_forgotten_when_their_lease_ends() -> None:
    clock = ManualClock()
    state = BridgeState(BridgeSettings(), services=(), clock=clock, rng=random.Random(1))
    short = make_record(now=clock.now, ttl=5.0)
    long = make_record(now=clock.now, ttl=500.0)
    for record in (short, long):
        state.queue_publish(record)  # the DHT is down: nothing publishes them
    clock.advance(10.0)
    state.forget(clock.now)
    assert list(state.to_publish) == [long.worker_id]
    assert list(state.fallback) == [long.worker_id]
