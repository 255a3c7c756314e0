"""Fault tests of the bridge with real parts: 100 workers heartbeating over UDP DHT nodes, the
test's own redis-server killed and restarted empty, and the bridge process itself SIGKILLed
during an outage. Nothing that happened during an outage may be lost."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from dht_bridge.bridge.journal import Journal
from dht_bridge.dht.node import DHTNode
from dht_bridge.records import WorkerRecord
from tests.support.bridge import (
    SimWorker,
    Swarm,
    fault_registry,
    journal_lines,
    missing_in_redis,
    newest_by_worker,
    redis_has_at_least,
    running_bridge,
    start_bridge_node,
)
from tests.support.dht import start_network, start_node, stop_all
from tests.support.helpers import free_port, make_record, wait_for
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
CONVERGE = 30.0  # seconds for Redis to hold everything after it (or the bridge) is back
WORKERS = 100
CHURN = 10


class JournalWatch:
    """A condition on a journal file read from outside: it holds, per worker of `wanted`, that
    seq or a newer one, and per worker of `beaten` a seq above the one given (so the outage
    spanned a round of heartbeats). `missing` says what is not there yet."""

    def __init__(self, path: Path, wanted: dict[str, int], beaten: dict[str, int]) -> None:
        self.path = path
        self.wanted = wanted
        self.beaten = beaten
        self.missing: list[str] = []

    def __call__(self) -> bool:
        newest = newest_by_worker(journal_lines(self.path))
        self.missing = []
        for wid, seq in self.wanted.items():
            got = newest.get(wid)
            if got is None or got.seq < seq:
                self.missing.append(f"{wid[:8]} want {seq} has {got.seq if got else None}")
        for wid, seq in self.beaten.items():
            got = newest.get(wid)
            if got is None or got.seq <= seq:
                self.missing.append(f"{wid[:8]} beat>{seq} has {got.seq if got else None}")
        return not self.missing


async def wait_journaled(watch: JournalWatch, what: str | Callable[[], str]) -> None:
    """Wait for `watch`, naming what is missing on timeout."""
    try:
        await wait_for(watch, timeout=CONVERGE, message=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; missing {len(watch.missing)}: {watch.missing[:10]}") from None


def _published_seqs(workers: Iterable[SimWorker]) -> dict[str, int]:
    return {w.worker_id: w.last.seq for w in workers if w.last is not None}


async def _joined(workers: list[SimWorker]) -> dict[str, int]:
    """The first published seq of each new worker, once each has published."""
    await wait_for(
        lambda: all(w.last is not None for w in workers),
        timeout=CONVERGE,
        message="the new workers' first heartbeats",
    )
    return _published_seqs(workers)


@dataclass
class Outage:
    """What happened while Redis was down, for the journal to hold."""

    tombstones: dict[str, WorkerRecord]  # of the workers that left
    watch: JournalWatch  # the leavers' and joiners' seqs, and a beat of everyone staying


async def churn_during_outage(
    swarm: Swarm,
    workers: list[SimWorker],
    seed: tuple[str, int],
    services: Sequence[tuple[str, ...]],
    journal: Path,
    joined: list[DHTNode],
) -> Outage:
    """Redis is down: the first len(services) workers leave (tombstones), as many new ones
    join offering `services` (their nodes go in `joined`, for the caller to stop), the rest
    heartbeat on."""
    at_kill = _published_seqs(workers)
    leaving = workers[: len(services)]
    tombstones = {w.worker_id: await swarm.leave(w) for w in leaving}
    for offered in services:
        node = await start_node(seeds=[seed])
        joined.append(node)
        swarm.add(node, offered)
    new = swarm.workers[-len(services) :]
    await swarm.first_beats(new)
    swarm.start(new)
    wanted = {**_published_seqs(leaving), **await _joined(new)}
    staying = {w: seq for w, seq in at_kill.items() if w not in tombstones}
    return Outage(tombstones, JournalWatch(journal, wanted, staying))


async def test_redis_killed_and_restarted_empty_loses_nothing(
    make_redis_server: Callable[[], RedisServer], tmp_path: Path
) -> None:
    server = make_redis_server()
    registry = fault_registry(server.url)
    nodes = await start_network(WORKERS + 1)
    bridge_node = await start_bridge_node(nodes[0])
    swarm = Swarm(interval=2.0, ttl=20.0)
    joiners: list[DHTNode] = []
    journal = tmp_path / "journal.jsonl"
    try:
        workers = [
            swarm.add(node, ("ocr",) if i % 3 else ("ocr", "gpu"))
            for i, node in enumerate(nodes[1:])
        ]
        await swarm.first_beats(workers)
        async with running_bridge(
            bridge_node, registry, journal, bootstrap=[nodes[0].address]
        ) as bridge:
            published = swarm.start()
            await wait_for(
                lambda: redis_has_at_least(registry, published),
                timeout=CONVERGE,
                message="100 workers in Redis",
            )

            server.kill()
            await wait_for(lambda: not bridge.redis_up, timeout=10, message="Redis seen down")
            offered = [("ocr", "gpu") if i % 2 else ("ocr",) for i in range(CHURN)]
            outage = await churn_during_outage(
                swarm, workers, nodes[0].address, offered, journal, joiners
            )
            tombstones = outage.tombstones
            await wait_journaled(
                outage.watch, "the outage's changes and a round of heartbeats journaled"
            )
            assert bridge.figures()["rma_bridge_journal_records"] > 0

            server.start()  # empty, as a lost server would be
            restarted = time.monotonic()
            wanted = swarm.newest()
            await wait_for(
                lambda: redis_has_at_least(registry, wanted),
                timeout=CONVERGE,
                message="every newest record and tombstone in the restarted Redis",
            )
            took = time.monotonic() - restarted
            for wid, tombstone in tombstones.items():
                stored = await registry.get(wid)
                assert stored is not None
                assert stored.tombstone
                assert stored.seq >= tombstone.seq
            providers = {r.worker_id for r in await registry.lookup("ocr", limit=500)}
            assert providers == {w.worker_id for w in swarm.live()}
            await wait_for(
                lambda: bridge.journal.depth == 0, timeout=CONVERGE, message="journal truncated"
            )
            figures = bridge.figures()
            assert figures["rma_bridge_replayed_total"] > 0
            # Usually one; a connection that was in use when Redis died may fail once more.
            assert figures["rma_bridge_redis_outages_total"] >= 1
            assert figures["rma_bridge_journal_dropped_total"] == 0
            assert took < CONVERGE
    finally:
        await swarm.aclose()
        await stop_all([*nodes, *joiners, bridge_node])
        await registry.aclose()


@contextlib.contextmanager
def bridge_process(
    *, redis_url: str, dht_port: int, seed: tuple[str, int], journal: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m rma bridge` as a child process; SIGKILLed at the end if still running."""
    command = [
        *(sys.executable, "-m", "rma", "bridge", "--redis-url", redis_url),
        *("--dht-port", str(dht_port), "--bootstrap", f"{seed[0]}:{seed[1]}"),
        *("--journal", str(journal), "--sync-interval", "1", "--probe-interval", "0.5"),
        *("--metrics-port", "-1"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMA_")}
    env.update({"RMA_REDIS_TIMEOUT": "0.5", "RMA_DHT_RPC_TIMEOUT": "1.0"})
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


async def test_a_sigkilled_bridge_loses_nothing_that_reached_its_journal(
    make_redis_server: Callable[[], RedisServer], tmp_path: Path
) -> None:
    server = make_redis_server()
    registry = fault_registry(server.url)
    nodes = await start_network(21)
    swarm = Swarm(interval=1.0, ttl=60.0)
    journal = tmp_path / "journal.jsonl"
    log = tmp_path / "bridge.log"
    joined: list[DHTNode] = []
    dht_port = free_port(kind=socket.SOCK_DGRAM)

    def bridge() -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        return bridge_process(
            redis_url=server.url, dht_port=dht_port, seed=nodes[0].address, journal=journal, log=log
        )

    try:
        workers = [swarm.add(node, ("ocr",)) for node in nodes[1:]]
        await swarm.first_beats(workers)
        published = swarm.start()
        with bridge() as process:
            await wait_for(
                lambda: redis_has_at_least(registry, published),
                timeout=CONVERGE,
                message=lambda: f"workers in Redis through the bridge process; log: {_tail(log)}",
            )
            server.kill()
            outage = await churn_during_outage(
                swarm, workers, nodes[0].address, [("ocr",)] * 3, journal, joined
            )
            tombstones = outage.tombstones
            await wait_journaled(
                outage.watch, lambda: f"the outage journaled by the process; log: {_tail(log)}"
            )
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        journaled = newest_by_worker(journal_lines(journal))
        assert set(tombstones) <= set(journaled)
        # Only the journal can tell Redis now: the whole DHT goes away with the bridge.
        await swarm.aclose()
        await stop_all([*nodes, *joined])
        server.start()
        with bridge() as process:
            await wait_for(
                lambda: redis_has_at_least(registry, journaled),
                timeout=CONVERGE,
                message=lambda: f"journaled records replayed; log: {_tail(log)}",
            )
            assert not await missing_in_redis(registry, journaled)
            for wid in tombstones:
                stored = await registry.get(wid)
                assert stored is not None
                assert stored.tombstone
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0, _tail(log)
        assert "bridge exited cleanly" in log.read_text()
    finally:
        await swarm.aclose()
        await stop_all([*nodes, *joined])
        await registry.aclose()


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])


async def test_a_bridge_started_without_redis_says_so_once_and_when_it_is_back(
    make_redis_server: Callable[[], RedisServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = make_redis_server()
    server.kill()  # a Redis not started yet, or a wrong port
    registry = fault_registry(server.url)
    node = await start_bridge_node(None)
    caplog.set_level(logging.DEBUG, logger="dht_bridge.bridge")
    try:
        async with running_bridge(node, registry, tmp_path / "journal.jsonl"):

            def attempts() -> int:
                return sum("Redis still unreachable" in r.message for r in caplog.records)

            await wait_for(lambda: attempts() >= 2, timeout=20, message="a few retries")
            warned = [
                r
                for r in caplog.records
                if r.levelno >= logging.WARNING and r.name == "dht_bridge.bridge.redis_side"
            ]
            assert len(warned) == 1, [r.getMessage() for r in warned]
            assert "Redis not reachable since the start" in warned[0].getMessage()
            server.start()
            await wait_for(
                lambda: "Redis reachable: replayed" in caplog.text, timeout=20, message="back"
            )
    finally:
        await stop_all([node])
        await registry.aclose()


class FullDiskOnce(Journal):
    """A journal whose first write fails as on a full disk."""

    failed = False

    def append(self, records: Iterable[WorkerRecord]) -> list[WorkerRecord]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().append(records)


async def test_records_a_failed_journal_write_refused_wait_in_memory_and_are_journaled_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = fault_registry(f"redis://127.0.0.1:{free_port()}/0")  # Redis down throughout
    nodes = await start_network(4)
    bridge_node = await start_bridge_node(nodes[0])
    path = tmp_path / "journal.jsonl"
    record = make_record(services=("ocr",), ttl=300.0)
    try:
        async with running_bridge(
            bridge_node, registry, path, bootstrap=[nodes[0].address], journal_type=FullDiskOnce
        ) as bridge:
            with caplog.at_level(logging.ERROR):
                await nodes[1].publish(record)  # every node of four holds it, the bridge's too
                await wait_for(
                    lambda: record in journal_lines(path),
                    timeout=CONVERGE,
                    message="the record journaled after the failed write",
                )
            assert bridge.counters.journal_failures >= 1
            assert "cannot write the journal" in caplog.text
    finally:
        await stop_all([*nodes, bridge_node])
        await registry.aclose()
