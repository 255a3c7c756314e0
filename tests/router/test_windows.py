"""The router's per-replica sliding-window counters (edge_router/windows.py)."""

from __future__ import annotations

import pytest
from limits import parse, parse_many

from edge_router.windows import LocalWindows
from tests.support.helpers import ManualClock

START = 1_800_000_000.0  # on a minute's boundary


def windows(clock: ManualClock, *, max_keys: int = 1000) -> LocalWindows:
    return LocalWindows(longest=60, max_keys=max_keys, clock=clock)


def test_a_client_over_its_rate_waits_until_the_window_takes_one_more() -> None:
    clock = ManualClock(START + 15)
    counters = windows(clock)
    rate = [parse("3/minute")]
    assert [counters.hit(rate, "a") for _ in range(3)] == [None, None, None]
    assert counters.hit(rate, "a") == 45  # the rest of this minute
    assert counters.hit(rate, "b") is None  # another key is counted apart
    clock.advance(44)
    assert counters.hit(rate, "a") is not None
    clock.advance(1.5)
    # The last minute's 3 still weigh 3 * (1 - 0.5 / 60): one more fits (as in `limits`).
    assert counters.hit(rate, "a") is None
    wait = counters.hit(rate, "a")
    assert wait is not None
    clock.advance(wait - 1)
    assert counters.hit(rate, "a") is not None
    clock.advance(1)
    assert counters.hit(rate, "a") is None


@pytest.mark.parametrize("offset", [0.0, 7.5, 59.0])
def test_retry_after_is_exact_to_the_second(offset: float) -> None:
    clock = ManualClock(START + offset)
    counters = windows(clock)
    rate = [parse("10/minute")]
    for step in range(400):
        wait = counters.hit(rate, "a")
        if wait is not None and wait > 1:
            clock.advance(wait - 1)
            assert counters.hit(rate, "a") is not None, step
            clock.advance(1)
            assert counters.hit(rate, "a") is None, step
        clock.advance(0.7)


def test_several_rates_count_a_hit_only_when_all_take_it() -> None:
    clock = ManualClock(START)
    counters = windows(clock)
    rates = parse_many("2/second;3/minute")
    assert counters.hit(rates, "a") is None
    assert counters.hit(rates, "a") is None
    assert counters.hit(rates, "a") is not None  # 2 a second
    clock.advance(2)  # past the last second and the one before, which the slide still weighs
    assert counters.hit(rates, "a") is None
    # The refused one above did not count against the minute: 3 a minute are now used.
    clock.advance(2)
    assert counters.hit(rates, "a") is not None


def test_memory_is_bounded_under_a_flood_of_addresses() -> None:
    clock = ManualClock(START)
    counters = windows(clock, max_keys=100)
    rate = [parse("5/minute")]
    for n in range(10_000):
        assert counters.hit(rate, f"198.51.{n // 256}.{n % 256}") is None
    assert len(counters) <= 100
