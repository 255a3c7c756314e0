"""Test parts for the bridge: simulated workers heartbeating over real DHT nodes, a bridge on
its own node, a network partition for one node, and reading a journal file from outside."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dht_bridge.backoff import ExponentialBackoff
from dht_bridge.bridge.bridge import Bridge, BridgeSettings
from dht_bridge.bridge.journal import Journal
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import DHTError, RegistryError
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord, sign_record, tombstone_for
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from tests.support.dht import TEST_SETTINGS, start_node
from tests.support.helpers import POLICY

# Short enough that outages show within a second, long enough for a loaded 2-core machine.
FAULT_REDIS_TIMEOUT = 0.5
BRIDGE_SETTINGS = BridgeSettings(
    sync_interval=1.0,
    probe_interval=0.5,
    flush_delay=0.02,
    backoff=ExponentialBackoff(base=0.1, cap=0.5),
)
SERVICES = ("ocr", "gpu")


def fault_registry(url: str) -> Registry:
    """A registry with the short timeout of fault tests."""
    return open_registry(
        RegistrySettings(redis_url=url, timeout=FAULT_REDIS_TIMEOUT), policy=POLICY
    )


@dataclass
class SimWorker:
    """A worker as the agent would be: its own DHT node, publishing its own signed record with
    a rising seq on every heartbeat, and a tombstone when it leaves."""

    node: DHTNode
    identity: Identity = field(default_factory=Identity.generate)
    services: tuple[str, ...] = ("ocr",)
    ttl: float = 10.0
    seq: int = 0
    last: WorkerRecord | None = None
    left: bool = False

    @property
    def worker_id(self) -> str:
        """The worker's id."""
        return self.identity.worker_id

    def record(self, *, tombstone: bool = False) -> WorkerRecord:
        """The next record (seq + 1), signed now."""
        self.seq += 1
        if tombstone:
            assert self.last is not None
            record = tombstone_for(self.identity, self.last, now=time.time())
            self.seq = record.seq
        else:
            record = sign_record(
                self.identity,
                tunnel_url=f"https://w-{self.worker_id[:12]}.trycloudflare.com",
                services=self.services,
                seq=self.seq,
                now=time.time(),
                ttl=self.ttl,
                load=round(random.random(), 2),
            )
        return record

    async def beat(self) -> WorkerRecord | None:
        """Publish the next record; None if no node stored it (the DHT is cut off)."""
        record = self.record()
        try:
            await self.node.publish(record)
        except DHTError:
            return None
        self.last = record
        return record

    async def leave(self) -> WorkerRecord:
        """Publish a tombstone (the graceful leave) and stop."""
        self.left = True
        tombstone = self.record(tombstone=True)
        await self.node.publish(tombstone)
        self.last = tombstone
        return tombstone


class Swarm:
    """Simulated workers heartbeating every `interval` (with jitter) in the background."""

    def __init__(self, *, interval: float = 2.0, ttl: float = 10.0) -> None:
        self.interval = interval
        self.ttl = ttl
        self.workers: list[SimWorker] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._beating = asyncio.Event()
        self._beating.set()

    def add(self, node: DHTNode, services: tuple[str, ...]) -> SimWorker:
        """A new worker on `node`; it heartbeats once `start` (or at once if started)."""
        worker = SimWorker(node, services=services, ttl=self.ttl)
        self.workers.append(worker)
        return worker

    async def first_beats(self, workers: Iterable[SimWorker], concurrency: int = 16) -> None:
        """One heartbeat of each, a bounded number at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def one(worker: SimWorker) -> None:
            async with gate:
                await worker.beat()

        await asyncio.gather(*(one(w) for w in workers))

    def start(self, workers: Iterable[SimWorker] | None = None) -> dict[str, WorkerRecord]:
        """Heartbeat these workers (all by default) in the background; returns `newest()` as
        it was before: what to wait for in Redis. `newest()` asked at each poll moves with
        every beat, and holds only while no beat is between the DHT and Redis."""
        published = self.newest()
        for worker in self.workers if workers is None else workers:
            if worker.worker_id not in self._tasks and not worker.left:
                self._tasks[worker.worker_id] = asyncio.get_running_loop().create_task(
                    self._run(worker)
                )
        return published

    def pause(self) -> None:
        """Hold every heartbeat (workers stay alive; their next beat waits)."""
        self._beating.clear()

    def resume(self) -> None:
        """Heartbeat again."""
        self._beating.set()

    async def _run(self, worker: SimWorker) -> None:
        # Spread the first beats over one interval, as real workers start at random times.
        await asyncio.sleep(random.uniform(0, self.interval))
        while not worker.left:
            await self._beating.wait()
            await worker.beat()
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))

    async def stop(self, worker: SimWorker) -> None:
        """Stop heartbeating one worker (without a tombstone: it vanishes)."""
        task = self._tasks.pop(worker.worker_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def leave(self, worker: SimWorker) -> WorkerRecord:
        """Stop heartbeating and publish a tombstone."""
        await self.stop(worker)
        return await worker.leave()

    async def aclose(self) -> None:
        """Stop every heartbeat."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def live(self) -> list[SimWorker]:
        """Workers that have not left."""
        return [w for w in self.workers if not w.left]

    def newest(self) -> dict[str, WorkerRecord]:
        """The last record each worker published (live or tombstone)."""
        return {w.worker_id: w.last for w in self.workers if w.last is not None}


class Partition:
    """Cuts one node off the network: every datagram it sends or receives is dropped.

    Test-only fault injection on the node's protocol instance (the DHT code is untouched):
    like a firewall rule, both directions, healed with `heal()`.
    """

    def __init__(self, node: DHTNode) -> None:
        self.cut = False
        protocol = node.rpc
        send, receive = protocol._send, protocol.datagram_received

        def guarded_send(datagram: bytes, addr: tuple[str, int], name: str) -> bool:
            # A datagram lost on the wire was still sent, as far as the sender can tell.
            return True if self.cut else send(datagram, addr, name)

        def guarded_receive(data: bytes, addr: tuple[str, int]) -> None:
            if not self.cut:
                receive(data, addr)

        # Instance attributes shadow the methods; asyncio calls datagram_received on it.
        object.__setattr__(protocol, "_send", guarded_send)
        object.__setattr__(protocol, "datagram_received", guarded_receive)

    def __enter__(self) -> Partition:
        self.cut = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()

    def heal(self) -> None:
        """Let traffic through again."""
        self.cut = False


async def start_bridge_node(seed: DHTNode | None, **kwargs: Any) -> DHTNode:
    """The bridge's own node, joined through `seed`."""
    seeds = [seed.address] if seed is not None else []
    return await start_node(seeds=seeds, **kwargs)


@contextlib.asynccontextmanager
async def running_bridge(
    node: DHTNode,
    registry: Registry,
    journal_path: Path,
    *,
    bootstrap: Iterable[tuple[str, int]] = (),
    settings: BridgeSettings = BRIDGE_SETTINGS,
    journal_type: type[Journal] = Journal,
    **kwargs: Any,
) -> AsyncIterator[Bridge]:
    """A bridge running in the background for the block; its journal closed after."""
    journal = journal_type(journal_path)
    bridge = Bridge(node, registry, journal, settings=settings, bootstrap=list(bootstrap), **kwargs)
    try:
        async with bridge.running():
            yield bridge
    finally:
        journal.close()


def journal_lines(path: Path) -> list[WorkerRecord]:
    """Every complete record line of a journal file, read from outside the bridge."""
    if not path.exists():
        return []
    found = []
    for line in path.read_bytes().split(b"\n"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            found.append(WorkerRecord.from_dict(json.loads(line)["record"]))
    return found


def newest_by_worker(records: Iterable[WorkerRecord]) -> dict[str, WorkerRecord]:
    """Highest seq per worker (records of one worker in a journal only rise)."""
    best: dict[str, WorkerRecord] = {}
    for record in records:
        held = best.get(record.worker_id)
        if held is None or record.seq > held.seq:
            best[record.worker_id] = record
    return best


async def redis_has_at_least(registry: Registry, wanted: dict[str, WorkerRecord]) -> bool:
    """Does Redis hold, for every wanted worker, that record or a newer one? False while
    Redis does not answer (the first command after a restart may meet a dead connection)."""
    try:
        stored = {r.worker_id: r for r in await registry.records(limit=100_000)}
    except RegistryError:
        return False
    return all(
        wid in stored
        and (stored[wid].seq > want.seq or (stored[wid].seq == want.seq and stored[wid] == want))
        for wid, want in wanted.items()
    )


async def missing_in_redis(registry: Registry, wanted: dict[str, WorkerRecord]) -> list[str]:
    """Workers whose wanted record (or a newer one) Redis lacks; for failure messages."""
    stored = {r.worker_id: r for r in await registry.records(limit=100_000)}
    return [
        f"{wid[:8]}:seq{want.seq}{'T' if want.tombstone else ''}->"
        f"{stored[wid].seq if wid in stored else None}"
        for wid, want in wanted.items()
        if wid not in stored or stored[wid].seq < want.seq
    ]


def settings_for_port(port: int) -> Any:
    """Test DHT settings bound to a given UDP port (to restart a node where it was)."""
    return replace(TEST_SETTINGS, port=port)
