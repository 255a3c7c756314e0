"""The virtual clock (dht_bridge.netem.clock): time skips to the next timer, and a DHT network
on the emulated internet behaves under it as in real time (join, publish, lookup, leases). The
dilated clock: real time slowed down, timers and the time module with it."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from typing import Any

import pytest

from dht_bridge.dht.admission import ValidatedAddresses
from dht_bridge.identity import Identity
from dht_bridge.netem import CONTINENT, LAN, WORLD, EmulatedNetwork
from dht_bridge.netem.clock import (
    DilatedClockLoop,
    VirtualClockLoop,
    run_dilated,
    run_virtual,
    virtual_time,
)
from tests.support.helpers import make_record
from tests.support.netem import bounded, start_field

# Wall time a skipped hour may take, on a loaded 2-core machine.
SKIP_BUDGET = 1.0


def test_an_hour_of_sleep_passes_in_well_under_a_second() -> None:
    real_before = time.monotonic()

    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        started, wall = loop.time(), time.time()
        await asyncio.sleep(3600)
        return loop.time() - started, time.monotonic() - started, time.time() - wall

    began = time.perf_counter()
    on_loop, monotonic, wall = run_virtual(main())
    assert time.perf_counter() - began < SKIP_BUDGET
    # The loop's clock and the time module both moved by the hour, and only while it ran.
    assert on_loop == pytest.approx(3600)
    assert monotonic == pytest.approx(3600)
    assert wall == pytest.approx(3600)
    assert time.monotonic() - real_before < SKIP_BUDGET


def test_timers_fire_in_order_at_their_virtual_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        start, fired = loop.time(), []

        async def at(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            fired.append((name, loop.time() - start))

        await asyncio.gather(at("c", 90), at("a", 0.25), at("b", 30))
        # A timeout on the virtual clock expires at its virtual time too.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.sleep(10)
        fired.append(("timeout", loop.time() - start))
        return fired

    fired = run_virtual(main())
    assert [name for name, _ in fired] == ["a", "b", "c", "timeout"]
    assert [at for _, at in fired] == pytest.approx([0.25, 30, 90, 95])


def test_the_time_module_is_restored_after_the_run() -> None:
    loop = VirtualClockLoop(start=100.0, wall_start=1_000_000.0)
    try:
        with virtual_time(loop):
            assert (time.monotonic(), time.time()) == (100.0, 1_000_000.0)
            loop.advance(5)
            assert (time.monotonic(), time.time()) == (105.0, 1_000_005.0)
        assert time.time() > 1_700_000_000
    finally:
        loop.close()


def run_on_field(body: Any, *, profile: Any = CONTINENT, servers: int = 6, clients: int = 8) -> Any:
    """Build a small field under the virtual clock, run `body(field)`, close it."""

    async def main() -> Any:
        built = await start_field(
            EmulatedNetwork(profile, seed=21), servers=servers, clients=clients, seed=21
        )
        try:
            assert built.join_failures == 0
            return await body(built)
        finally:
            await built.aclose()

    return run_virtual(main())


def test_a_small_network_joins_publishes_and_looks_up_on_the_virtual_clock() -> None:
    async def body(field: Any) -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        identities = [Identity.generate() for _ in field.clients]
        records = [make_record(i, services=("ocr",)) for i in identities]
        jobs = [
            functools.partial(c.publish, r) for c, r in zip(field.clients, records, strict=True)
        ]
        assert all(report.stored for report in await bounded(jobs))
        started = loop.time()
        found = await field.clients[0].lookup("ocr", limit=20)
        took = loop.time() - started
        assert {r.worker_id for r in found} == {r.worker_id for r in records}
        got = await field.clients[-1].get_record(records[2].worker_id)
        assert got is not None
        assert got.worker_id == records[2].worker_id
        rtt = field.network.median_rtt()
        # An hour of the nodes' own maintenance, then the same lookup still answers.
        await asyncio.sleep(3600)
        for client, identity in zip(field.clients, identities, strict=True):
            await client.publish(make_record(identity, services=("ocr",), seq=2))
        again = await field.clients[1].lookup("ocr", limit=20)
        assert {r.worker_id for r in again} == {r.worker_id for r in records}
        return took, rtt, loop.time() - started

    began = time.perf_counter()
    took, rtt, span = run_on_field(body)
    # A lookup crosses the network: it costs at least one round trip, in virtual time, and
    # fewer than a timeout's worth of them (no datagram waits on the wall clock).
    assert rtt <= took < 20 * rtt + 1.0
    assert span >= 3600
    assert time.perf_counter() - began < 60


def test_leases_run_out_on_the_virtual_clock() -> None:
    async def body(field: Any) -> int:
        record = make_record(services=("ocr",), ttl=90)
        assert (await field.clients[0].publish(record)).stored
        assert await field.clients[1].get_record(record.worker_id) is not None
        # Past the lease with no heartbeat: every holder drops it (their clock is the loop's).
        await asyncio.sleep(200)
        gone = await field.clients[1].get_record(record.worker_id)
        return 0 if gone is None else 1

    assert run_on_field(body) == 0


def test_joins_through_ip_literals_need_no_resolver_thread() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()

        async def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"getaddrinfo{args} on a virtual clock")

        loop.getaddrinfo = refuse  # type: ignore[method-assign]
        built = await start_field(EmulatedNetwork(LAN, seed=22), servers=4, clients=2, seed=22)
        try:
            return built.join_failures + sum(len(n.rpc.router) == 0 for n in built.nodes)
        finally:
            await built.aclose()

    assert run_virtual(main()) == 0


def test_reachability_probes_run_on_the_emulated_network() -> None:
    async def body(field: Any) -> tuple[bool | None, bool | None]:
        coordinators = [c.address for c in field.coordinators]
        server = await field.servers[-1].check_reachability(coordinators)
        client = await field.clients[0].check_reachability(coordinators)
        return server.reachable, client.reachable

    # A server answers a probe from a fresh endpoint; a client's NAT refuses it.
    assert run_on_field(body, profile=dataclasses.replace(WORLD, loss=0.0)) == (True, False)


def test_address_validations_age_on_the_virtual_clock() -> None:
    async def main() -> tuple[bool, bool]:
        validated = ValidatedAddresses(ttl=600)
        validated.prove(("10.0.1.1", 4000))
        fresh = ("10.0.1.1", 4000) in validated
        await asyncio.sleep(601)
        return fresh, ("10.0.1.1", 4000) in validated

    assert run_virtual(main()) == (True, False)


def test_a_dilated_loop_lasts_factor_times_longer_in_real_seconds() -> None:
    factor, nap = 8.0, 0.05

    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        started, wall = loop.time(), time.time()
        await asyncio.sleep(nap)
        return loop.time() - started, time.monotonic() - started, time.time() - wall

    real_before = time.perf_counter()
    on_loop, monotonic, wall = run_dilated(main(), factor=factor)
    real = time.perf_counter() - real_before
    # The sleep lasted `nap` on the loop's clock and in the time module, `factor` times that
    # in real seconds (a loaded machine only adds to either).
    assert nap <= on_loop < nap + 1.0
    assert monotonic == pytest.approx(on_loop, abs=0.01)
    assert wall == pytest.approx(on_loop, abs=0.01)
    assert real >= factor * nap


def test_a_dilated_timeout_expires_in_order_and_the_time_module_comes_back() -> None:
    async def main() -> list[str]:
        fired: list[str] = []

        async def at(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            fired.append(name)

        await asyncio.gather(at("b", 0.02), at("a", 0.01))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        fired.append("timeout")
        return fired

    assert run_dilated(main(), factor=3.0) == ["a", "b", "timeout"]
    assert time.time() > 1_700_000_000
    with pytest.raises(ValueError, match="at least 1"):
        DilatedClockLoop(0.5)


def test_a_small_network_joins_publishes_and_looks_up_on_a_dilated_clock() -> None:
    async def main() -> tuple[int, float, float]:
        loop = asyncio.get_running_loop()
        network = EmulatedNetwork(dataclasses.replace(LAN, loss=0.0), seed=23)
        built = await start_field(network, servers=4, clients=3, seed=23)
        try:
            records = [make_record(services=("ocr",)) for _ in built.clients]
            jobs = [
                functools.partial(c.publish, r) for c, r in zip(built.clients, records, strict=True)
            ]
            assert all(report.stored for report in await bounded(jobs))
            started = loop.time()
            found = await built.clients[0].lookup("ocr", limit=10)
            return len(found), loop.time() - started, network.median_rtt()
        finally:
            await built.aclose()

    found, took, rtt = run_dilated(main(), factor=2.0)
    # Delays are on the loop's clock: a lookup costs at least a round trip of it.
    assert found == 3
    assert took >= rtt
