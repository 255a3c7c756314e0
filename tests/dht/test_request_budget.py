"""One host's flood is metered: each IP group gets a token bucket of requests (`RequestBudget`),
and a node drops what is over it before parsing it, logs that once, and never meters the
coordinators (bridges republishing Redis send the most)."""

from __future__ import annotations

import logging

import msgpack
import pytest

from dht_bridge.dht.admission import (
    DEFAULT_DIVERSITY,
    DiversityLimits,
    RequestBudget,
    cost_of,
)
from dht_bridge.errors import ConfigError
from tests.support.dht import NetworkFactory
from tests.support.helpers import wait_for
from tests.support.raw_peer import open_raw_peer


class Clock:
    """Time that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_group_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    budget = RequestBudget(DEFAULT_DIVERSITY.groups, rate=10.0, burst=5.0, clock=clock)
    assert [budget.allow(("198.51.100.7", 4000)) for _ in range(7)] == [True] * 5 + [False] * 2
    # Another port of the same address is the same host; the next address is not.
    assert not budget.allow(("198.51.100.7", 4001))
    assert budget.allow(("198.51.100.8", 4000))
    clock.now += 0.25  # 2.5 requests' worth
    assert [budget.allow(("198.51.100.7", 4000)) for _ in range(3)] == [True, True, False]
    clock.now += 60.0  # never more than the burst
    assert sum(budget.allow(("198.51.100.7", 4000)) for _ in range(10)) == 5


def test_ipv6_is_metered_per_64_and_loopback_per_port() -> None:
    budget = RequestBudget(DEFAULT_DIVERSITY.groups, rate=1.0, burst=1.0, clock=Clock())
    assert budget.allow(("2001:db8:1:2::1", 5000))
    assert not budget.allow(("2001:db8:1:2::ffff", 5000))  # the same /64
    assert budget.allow(("2001:db8:1:3::1", 5000))
    # A test network or the demo runs every node on 127.0.0.1.
    assert budget.allow(("127.0.0.1", 5000))
    assert budget.allow(("127.0.0.1", 5001))
    one_host_limits = DiversityLimits(loopback_by_port=False)
    one_host = RequestBudget(one_host_limits.groups, burst=1.0, clock=Clock())
    assert one_host.allow(("127.0.0.1", 5000))
    assert not one_host.allow(("127.0.0.1", 5001))


def test_a_big_request_takes_more_of_the_budget_than_a_small_one() -> None:
    budget = RequestBudget(DEFAULT_DIVERSITY.groups, rate=1.0, burst=20.0, clock=Clock())
    host = ("198.51.100.7", 4000)
    # 9 tokens each for the biggest STOREs: parsing is what a request costs before refusal.
    assert [budget.allow(host, 8192) for _ in range(3)] == [True, True, False]
    assert [budget.allow(host, 40) for _ in range(2)] == [True, False]


def test_the_group_heard_from_longest_ago_is_forgotten_first() -> None:
    budget = RequestBudget(DEFAULT_DIVERSITY.groups, rate=1.0, burst=1.0, capacity=2, clock=Clock())
    assert budget.allow(("192.0.2.1", 1))
    assert budget.allow(("192.0.2.2", 1))
    assert not budget.allow(("192.0.2.1", 1))  # heard again: now the latest
    assert budget.allow(("192.0.2.3", 1))  # forgets 192.0.2.2, not the flooder
    assert len(budget) == 2
    assert not budget.allow(("192.0.2.1", 1))
    assert budget.allow(("192.0.2.2", 1))  # forgotten, so a full bucket again


@pytest.mark.parametrize(
    ("rate", "burst", "capacity"), [(0.0, 5.0, 10), (1.0, 0.5, 10), (1.0, 5.0, 0)]
)
def test_a_budget_that_could_admit_nothing_is_refused(
    rate: float, burst: float, capacity: int
) -> None:
    with pytest.raises(ConfigError):
        RequestBudget(DEFAULT_DIVERSITY.groups, rate=rate, burst=burst, capacity=capacity)


async def test_a_node_drops_a_flood_over_its_budget_unread_and_says_so_once(
    network_factory: NetworkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dht_bridge.dht.protocol")
    (node,) = await network_factory(1)
    # Room for 20 of the flood's requests (each costs a little over a token: its size).
    size = 1 + 20 + len(msgpack.packb(["find_node", [b"f" * 20, b"k" * 20]]))
    burst = 20 * cost_of(size) + 0.5
    node.rpc.budget = RequestBudget(node.rpc.router.groups_at, rate=1.0, burst=burst, clock=Clock())
    transport, flooder = await open_raw_peer()
    try:
        asked = [
            flooder.request(node.address, "find_node", b"f" * 20, b"k" * 20) for _ in range(50)
        ]
        await wait_for(
            lambda: node.rpc.stats.over_budget == 30,
            timeout=5,
            message="30 requests over the budget dropped",
        )
        assert node.rpc.stats.requests_in == 20  # the others were never parsed
        assert node.rpc.stats.rpc_bytes["over_budget"] > 0
        await wait_for(  # those held for the check of the flooder's address come cut
            lambda: sum(msg not in flooder._replies for msg in asked) == 20,
            timeout=5,
            message="20 answers at the flooder",
        )
        warnings = [r for r in caplog.records if "dropping requests from" in r.getMessage()]
        assert len(warnings) == 1
        # A coordinator (a bridge) is never metered.
        node.set_coordinators([flooder.address])
        for _ in range(50):
            flooder.request(node.address, "ping", b"f" * 20)
        await wait_for(
            lambda: node.rpc.stats.requests_in == 70,
            timeout=5,
            message="every request of a coordinator read",
        )
        assert node.rpc.stats.over_budget == 30
    finally:
        transport.close()
