"""Benchmark on an emulated internet: our DHT's lookups, their success and the traffic per node
under a network profile (round trips, jitter, loss, NAT), beside the stock library's gets.

One process, one event loop, no socket: every node runs on its own host of a
`dht_bridge.netem` network (`--profile`: lan, continent, world), so the figures carry the
profile's round trips rather than loopback's. The run, for ours and then for the stock
`kademlia.network.Server` on a network of the same profile and seed (the n-th host in the
same region):

1. build: a few coordinators, then servers, then clients behind NAT (`--clients`, 80%; the
   stock library has no client mode, so all its nodes are servers), each joining through
   two coordinators or servers;
2. every node is a worker: it publishes its signed record offering one of `--services`
   services (the stock nodes `set` a value of the same size under the same key name);
3. steady window (`--window` s, after `--settle` s): every worker heartbeats every
   `--heartbeat` s (+-10%), as
   the agent does (the stock nodes `set` again); bytes per second per node are counted on
   the emulated links, clients, servers and coordinators apart;
4. lookups, heartbeats going on: cold service lookups (a reader's first lookup of that
   service, `lookup(service, limit=10)`), gets of random workers' records (`get_record`; a
   worker up and published since it came up, since one back from a departure has no record
   out until its first publish lands), and for the stock library gets of the same keys; each
   timed in ms and in median round trips of the profile (the median base RTT between the
   run's hosts).

Every node shares one event loop: its lateness (p50, p99) is printed beside the lookups, since
it adds to every figure. Quantiles are nearest-rank (common.quantile). `--jobs 2` runs ours and
the stock library as two processes at once (each with every node on its own loop), then
reports both as one run would.

    .venv/bin/python bench/field_bench.py --profile world --nodes 200 \\
        --out bench/results/field-world-200.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import field_bench_report as report
from common import ROOT, HelpFormatter, machine, write_json
from dht_bench_child import RawLogCounter
from field_bench_churn import Churn, ChurnCounts, SessionModel
from kademlia.utils import digest

from dht_bridge.dht.node import DHTNode
from dht_bridge.dht.values import encode_value
from dht_bridge.errors import BootstrapError, DHTError
from dht_bridge.identity import Identity
from dht_bridge.netem import PROFILES, EmulatedNetwork, Host, Profile, StockServer
from dht_bridge.netem.clock import run_dilated, run_virtual
from dht_bridge.records import WorkerRecord, tombstone_for
from tests.support.helpers import POLICY, make_record
from tests.support.netem import (
    FIELD_SETTINGS,
    FIELD_WORKER_SETTINGS,
    Field,
    bounded,
    start_field,
)
from worker.discovery import Discovery, DiscoveryCache, discover

logger = logging.getLogger("field_bench")

DEFAULT_DEADLINE = 30.0
HEARTBEAT_JITTER = 0.1
LOOKUP_LIMIT = 10
T = TypeVar("T")
# Warm discoveries: caches filled this many rounds of --concurrency lookups before they are asked.
WARM_CHUNK = 4
LAG_TICK = 0.01
# Lookups and publishes under way at once (all nodes share one loop).
DEFAULT_CONCURRENCY = 8
PUBLISH_GATE = 16
# A publish or stock `set` that failed (ValueError: the stock set's max([]) when no neighbour
# answered); the worker tries again at its next heartbeat.
BEAT_ERRORS = (DHTError, OSError, ValueError)

_ = ROOT  # importing common puts the checkout on sys.path


@dataclass
class Op:
    """One timed operation: seconds taken, whether it found what it should, and its cost."""

    seconds: float
    ok: bool
    hops: int = 0
    rounds: int = 0
    local: bool = False
    dead_share: float = 0.0  # of the providers returned, the share whose worker was down
    # For each provider returned whose worker was down: how long it had been down, seconds.
    dead_for: list[float] = field(default_factory=list)
    age: float = 0.0  # how old the answer was (a cached discovery's)


@dataclass
class Worker:
    """A worker of the run: its node (ours or stock), host, identity and service."""

    node: Any
    host: Host
    identity: Identity
    service: str
    role: str  # coordinator, server or client
    seq: int = 1
    heartbeats: int = 0
    failed: int = 0
    key: str = ""
    value: bytes = b""
    port: int = 0
    alive: bool = True
    listed: bool = False  # up, and a publish of this session has landed
    listed_at: float = 0.0  # when the latest publish landed
    down_since: float = 0.0
    saved: dict[str, Any] = field(default_factory=dict)  # its state file, when down
    last: WorkerRecord | None = None

    def landed(self) -> None:
        """A publish of its record landed: a get of it should find it from now on."""
        self.listed = True
        self.listed_at = time.monotonic()

    def record(self, lease: float) -> WorkerRecord:
        """The worker's next record (seq one up)."""
        self.seq += 1
        self.last = make_record(
            self.identity,
            services=(self.service,),
            seq=self.seq,
            ttl=lease,
            region=self.host.region,
        )
        return self.last


@dataclass
class Run:
    """What one implementation's run produced."""

    impl: str
    workers: list[Worker] = field(default_factory=list)
    # The wall and loop clocks when the run began (made in the loop), for its progress lines.
    began: tuple[float, float] = field(
        default_factory=lambda: (time.perf_counter(), asyncio.get_running_loop().time())
    )
    build_s: float = 0.0
    join_failures: int = 0
    published: int = 0
    window_s: float = 0.0
    sent: dict[str, list[float]] = field(default_factory=dict)  # role -> bytes/s per node
    received: dict[str, list[float]] = field(default_factory=dict)
    ops: dict[str, list[Op]] = field(default_factory=dict)
    lag: list[float] = field(default_factory=list)
    loss_seen: float = 0.0
    churn: ChurnCounts | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LagProbe:
    """Measures how late the shared event loop runs a timer, while it is open."""

    def __init__(self) -> None:
        self.late: list[float] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LagProbe]:
        """Probe until the block ends."""
        task = asyncio.get_running_loop().create_task(self._probe(), name="lag-probe")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK)
            self.late.append(loop.time() - before - LAG_TICK)


async def timed(
    op: Callable[[], Awaitable[Op]], deadline: float
) -> Op:  # the op fills in everything but the time
    """Run `op` within `deadline`; its time, or a failure at the deadline."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(deadline):
            result = await op()
    except (TimeoutError, DHTError, OSError) as exc:
        # Failures are rare at any size measured: each is worth its line in the run's log.
        elapsed = time.monotonic() - started
        logger.warning("an operation failed after %.1f s: %r", elapsed, exc)
        return Op(elapsed, False)
    result.seconds = time.monotonic() - started
    return result


# Heartbeats: ours publish a new record, the stock nodes set their value again.


async def heartbeat(
    worker: Worker, beat: Callable[[Worker], Awaitable[None]], interval: float, rng: random.Random
) -> None:
    """Beat every `interval` (+-10%), the first within one interval."""
    await asyncio.sleep(rng.uniform(0, interval))
    while True:
        try:
            if worker.alive:
                await beat(worker)
                worker.heartbeats += 1
                worker.landed()
        except BEAT_ERRORS as exc:
            worker.failed += 1
            logger.debug("heartbeat failed: %s", exc)
        await asyncio.sleep(interval * rng.uniform(1 - HEARTBEAT_JITTER, 1 + HEARTBEAT_JITTER))


async def publish_all(workers: Sequence[Worker], beat: Callable[[Worker], Awaitable[None]]) -> int:
    """Every worker's first publish, a few at a time; how many of them landed."""

    async def first(worker: Worker) -> bool:
        try:
            await beat(worker)
        except BEAT_ERRORS:
            return False
        worker.landed()
        return True

    return sum(await bounded([partial(first, w) for w in workers], PUBLISH_GATE))


@contextlib.asynccontextmanager
async def heartbeating(
    workers: Sequence[Worker], beat: Callable[[Worker], Awaitable[None]], args: argparse.Namespace
) -> AsyncIterator[None]:
    """Every worker heartbeats while the block runs; the tasks are cancelled after it."""
    rng = random.Random(args.seed)
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(heartbeat(w, beat, args.heartbeat, rng), name="heartbeat") for w in workers
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def rpc_tally(worker: Worker) -> dict[str, int]:
    """Our node's bytes so far by RPC (in + out), and contacts asked by crawl purpose."""
    if not isinstance(worker.node, DHTNode):
        return {}
    asked = {f"asked:{k}": v for k, v in worker.node.crawl_queries.items()}
    return dict(worker.node.rpc.stats.rpc_bytes) | asked


async def steady_window(run: Run, workers: Sequence[Worker], args: argparse.Namespace) -> None:
    """Count each host's bytes over `--window` seconds (heartbeats running), and for our
    nodes where they went: bytes by RPC and contacts asked by crawl purpose, per role."""
    before = traffic_of(workers)
    tallies = {id(w): (w.node, rpc_tally(w)) for w in workers}
    started = time.monotonic()
    await asyncio.sleep(args.window)
    run.window_s = time.monotonic() - started
    for role, rates in rates_since(workers, before, run.window_s).items():
        run.sent[role] = [sent for sent, _ in rates]
        run.received[role] = [received for _, received in rates]
    by_role: dict[str, dict[str, float]] = {}
    for w in workers:
        node0, tally0 = tallies[id(w)]
        if w.node is not node0 or not tally0:
            continue  # restarted in the window (a new node's counters) or the stock library
        role = by_role.setdefault(w.role, {"nodes": 0})
        role["nodes"] += 1
        for name, total in rpc_tally(w).items():
            role[name] = role.get(name, 0) + total - tally0.get(name, 0)
    if by_role:
        run.extra["window_by_rpc"] = {
            role: {
                name: round(total / tally["nodes"] / run.window_s, 1)
                for name, total in sorted(tally.items(), key=lambda kv: -kv[1])
                if name != "nodes"
            }
            for role, tally in by_role.items()
        }


async def settling(workers: Sequence[Worker], seconds: float) -> dict[str, float]:
    """Heartbeats run `seconds` before the window opens: mean B/s per node by role meanwhile.

    Every worker published at once when the network was built, into shards still filling, so
    the first heartbeat rounds move many workers down the trie (holder crawls, proofs). A
    mass restart would do the same; the steady state is what the window measures."""
    before = traffic_of(workers)
    await asyncio.sleep(seconds)
    return {
        role: round(sum(sent + received for sent, received in rates) / len(rates), 1)
        for role, rates in rates_since(workers, before, seconds).items()
    }


def traffic_of(workers: Sequence[Worker]) -> dict[int, tuple[int, int]]:
    """Bytes each worker's host has sent and received so far."""
    return {id(w): (w.host.traffic.sent_bytes, w.host.traffic.received_bytes) for w in workers}


def rates_since(
    workers: Sequence[Worker], before: dict[int, tuple[int, int]], seconds: float
) -> dict[str, list[tuple[float, float]]]:
    """Each worker's B/s sent and received since `before` (from `traffic_of`), by role."""
    rates: dict[str, list[tuple[float, float]]] = {}
    per = 1 / seconds if seconds > 0 else 0.0
    for w in workers:
        sent0, received0 = before[id(w)]
        sent, received = (
            w.host.traffic.sent_bytes - sent0,
            w.host.traffic.received_bytes - received0,
        )
        rates.setdefault(w.role, []).append((sent * per, received * per))
    return rates


async def measure(
    run: Run,
    network: EmulatedNetwork,
    beat: Callable[[Worker], Awaitable[None]],
    lookups: Callable[[], Awaitable[dict[str, list[Op]]]],
    args: argparse.Namespace,
    churn: Churn[Worker] | None = None,
) -> None:
    """Phases 2 to 4 on a built network: first publishes, the steady window, the lookups;
    with `churn`, workers come and go all through the window and the lookups."""
    progress(run, f"{len(run.workers)} nodes built")
    run.published = await publish_all(run.workers, beat)
    progress(run, "first publishes done")
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(heartbeating(run.workers, beat, args))
        if churn is not None:
            run.churn = await stack.enter_async_context(churn.running(run.workers))
        run.extra["settle_b_s"] = await settling(run.workers, args.settle)
        progress(run, "settled")
        await steady_window(run, run.workers, args)
        progress(run, "window done")
        probe = LagProbe()
        async with probe.running():
            run.ops = await lookups()
        run.lag = probe.late
    traffic = network.traffic
    run.loss_seen = traffic.lost / max(1, traffic.sent)
    run.extra |= {
        "median_rtt_s": network.median_rtt(),
        "uplink_b_s": args.uplink,
        "uplink_overflow": traffic.overflow,
        "heartbeats": sum(w.heartbeats for w in run.workers),
        "heartbeats_failed": sum(w.failed for w in run.workers),
    }


def progress(run: Run, what: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """One line on stderr with the wall and loop seconds since `run` began, to follow it."""
    wall = time.perf_counter() - run.began[0]
    loop_s = (loop or asyncio.get_running_loop()).time() - run.began[1]
    print(
        f"[{wall:.1f} s wall, {loop_s:.1f} s loop] {run.impl}: {what}",
        file=sys.stderr,
        flush=True,
    )


class Watch:
    """Every `every` wall seconds, a progress line on the run under way: nodes, workers listed,
    datagrams sent and dropped at full lines. From a thread, since the loop's clock may leap
    (virtual) or crawl (a STORE storm) and a long run must still say where it is."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._followed: tuple[Run, EmulatedNetwork, asyncio.AbstractEventLoop] | None = None

    def follow(self, run: Run, network: EmulatedNetwork) -> None:
        """Report on `run` over `network` from now on (called in the loop)."""
        self._followed = (run, network, asyncio.get_running_loop())

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        """Lines while the block runs (none with `every` 0)."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.every):
                if self._followed is not None:
                    run, network, loop = self._followed
                    traffic = network.traffic  # plain ints: a torn read is a line off by a few
                    listed = sum(w.listed for w in list(run.workers))
                    progress(
                        run,
                        f"{len(network.hosts)} hosts, {listed} workers listed, datagrams sent "
                        f"{traffic.sent:,}, dropped at full lines {traffic.overflow:,}",
                        loop,
                    )

        thread = threading.Thread(target=tick, name="field-bench-watch", daemon=True)
        if self.every > 0:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread.is_alive():
                thread.join()


def services(args: argparse.Namespace) -> list[str]:
    """The run's service names."""
    return [f"svc-{i}" for i in range(args.services)]


def session_model(args: argparse.Namespace) -> SessionModel | None:
    """The churn's session law, or None without churn."""
    if args.no_churn:
        return None
    return SessionModel.named(args.session_dist, args.session_median)


def churn_of(
    model: SessionModel | None,
    depart: Callable[[Worker, bool], Awaitable[None]],
    restart: Callable[[Worker], Awaitable[bool | None]],
    beat: Callable[[Worker], Awaitable[None]],
    seed: int,
) -> Churn[Worker] | None:
    """The run's churn (None without): a restarted worker publishes at once."""
    if model is None:
        return None

    async def rejoined(worker: Worker) -> None:
        with contextlib.suppress(*BEAT_ERRORS):
            await beat(worker)
            worker.landed()

    return Churn(model, depart=depart, restart=restart, rejoined=rejoined, seed=seed)


def pick_alive(
    rng: random.Random, workers: Sequence[Worker], *avoid: Worker, listed: bool = False
) -> Worker:
    """A worker that is up (and not one of `avoid`); with `listed`, one that has also published
    since it came up: one whose record a get can find. A worker back from a departure is up a
    few round trips before its first publish lands, and a get of it in that spell finds
    nothing however good the DHT."""
    up = [w for w in workers if w.alive and (w.listed or not listed) and w not in avoid]
    return rng.choice(up)


def roles(args: argparse.Namespace) -> tuple[int, int]:
    """(servers, clients) of our network: at least the coordinators are servers."""
    clients = min(round(args.nodes * args.clients), args.nodes - args.coordinators)
    return args.nodes - clients, clients


# Our DHT.


async def run_ours(args: argparse.Namespace, profile: Profile, watch: Watch) -> Run:
    """Build, publish, window and lookups on our DHTNode."""
    run = Run("ours")
    network = EmulatedNetwork(profile, seed=args.seed, uplink=args.uplink)
    watch.follow(run, network)
    servers, clients = roles(args)
    started = time.monotonic()
    built = await start_field(
        network,
        servers=servers,
        clients=clients,
        coordinators=args.coordinators,
        settings=FIELD_WORKER_SETTINGS,
        coordinator_settings=FIELD_SETTINGS,
        seed=args.seed,
        gate=args.join_parallel,
    )
    try:
        run.build_s = time.monotonic() - started
        run.join_failures = built.join_failures
        frozen(args)
        run.workers = workers_of(built, args)
        lease = args.heartbeat * 3

        async def publish(worker: Worker) -> None:
            await worker.node.publish(
                worker.record(lease), again_within=args.heartbeat * (1 + HEARTBEAT_JITTER)
            )

        coordinators = [c.address for c in built.coordinators]
        seed = args.seed

        async def depart(worker: Worker, crash: bool) -> None:
            node: DHTNode = worker.node
            worker.saved = node.state()
            if crash:
                worker.host.crash()
            elif worker.last is not None:
                with contextlib.suppress(*BEAT_ERRORS):
                    await node.publish(tombstone_for(worker.identity, worker.last, now=time.time()))
            await node.aclose()

        async def restart(worker: Worker) -> bool | None:
            node = DHTNode(
                FIELD_WORKER_SETTINGS,
                policy=POLICY,
                node_id=bytes.fromhex(worker.saved["node_id"]),
                client=worker.role == "client",
                endpoint=worker.host.endpoint,
                coordinators=coordinators,
            )
            await node.listen(port=worker.port)
            node.restore_levels(worker.saved["levels"])
            via = False
            for seeds in ([tuple(p) for p in worker.saved["neighbors"]], coordinators):
                try:
                    await node.bootstrap(seeds)
                    break
                except BootstrapError:
                    via = True
            else:
                await node.aclose()
                return None
            worker.node = node
            return via

        model = session_model(args)
        churn = churn_of(model, depart, restart, publish, seed)
        await measure(run, network, publish, lambda: our_lookups(run.workers, args), args, churn)
        run.extra |= {
            "reprieves": sum(w.node.rpc.stats.reprieves for w in run.workers),
            "rpc_timeouts": sum(w.node.rpc.stats.timeouts for w in run.workers),
            "nat_filtered": network.traffic.filtered,
        }
    finally:
        await asyncio.gather(*(w.node.aclose() for w in run.workers))
        await built.aclose()
    return run


def workers_of(built: Field, args: argparse.Namespace) -> list[Worker]:
    """One worker per node of `built`, services dealt round-robin."""
    names = services(args)
    coordinators = {id(c) for c in built.coordinators}
    workers = []
    for i, node in enumerate(built.nodes):
        role = (
            "coordinator"
            if id(node) in coordinators
            else ("client" if node in built.clients else "server")
        )
        worker = Worker(node, built.host_of(node), Identity.generate(), names[i % len(names)], role)
        worker.port = node.address[1]
        workers.append(worker)
    return workers


async def our_lookups(workers: list[Worker], args: argparse.Namespace) -> dict[str, list[Op]]:
    """Cold service lookups, warm discoveries and record gets from random readers.

    Under churn a reader or target that is down when its turn comes is replaced by one that is
    up, and so is a reader that goes down during its lookup (the time counts); a lookup
    succeeds with 10 providers, or with every provider up when fewer. A warm discovery is
    `DiscoveryCache.discover` (max age one heartbeat) of a (reader, service) whose cache was
    filled just before (`WARM_CHUNK` rounds of lookups before), by readers up then and still
    up; `local %` says how many the cache answered."""
    rng = random.Random(args.seed + 1)
    by_id = {w.identity.worker_id: w for w in workers}
    pairs = [(w, name) for w in workers for name in services(args)]
    cold = rng.sample(pairs, min(args.lookups, len(pairs)))

    def judge(providers: list[WorkerRecord], name: str) -> tuple[bool, float, list[float]]:
        up = sum(w.alive and w.service == name for w in workers)
        now = time.monotonic()
        dead_for = [
            now - by_id[r.worker_id].down_since
            for r in providers
            if r.worker_id in by_id and not by_id[r.worker_id].alive
        ]
        share = len(dead_for) / len(providers) if providers else 0.0
        return len(providers) >= min(LOOKUP_LIMIT, up), share, dead_for

    async def from_live(reader: Worker, ask: Callable[[Any], Awaitable[T]], *avoid: Worker) -> T:
        """`ask(node)` from `reader`'s node, or a live stand-in's when it is down; asked again
        from another when the asker goes down during it: nobody is left to want the answer."""
        asker = reader if reader.alive else pick_alive(rng, workers, *avoid)
        while True:
            node = asker.node
            answer = await ask(node)
            if node.rpc.listening:
                return answer
            asker = pick_alive(rng, workers, *avoid)

    def service_lookup(reader: Worker, name: str) -> Callable[[], Awaitable[Op]]:
        async def op() -> Op:
            got = await from_live(reader, lambda node: node.lookup_report(name, limit=LOOKUP_LIMIT))
            ok, share, dead_for = judge(got.providers, name)
            return Op(0.0, ok, got.hops, got.rounds, dead_share=share, dead_for=dead_for)

        return lambda: timed(op, args.deadline)

    caches: dict[int, DiscoveryCache] = {}

    def cache_of(reader: Worker) -> DiscoveryCache:
        if id(reader) not in caches:

            async def fetch(service: str, limit: int) -> Discovery:
                return await discover(
                    service, limit=limit, node=reader.node, edge=None, deadline=args.deadline
                )

            # Clocks given here, read now: under --virtual they are the loop's.
            caches[id(reader)] = DiscoveryCache(
                fetch, max_age=args.heartbeat, clock=time.monotonic, wall=time.time
            )
        return caches[id(reader)]

    def warm_discover(reader: Worker, name: str) -> Callable[[], Awaitable[Op]]:
        async def op() -> Op:
            got = await cache_of(reader).discover(name, LOOKUP_LIMIT)
            ok, share, dead_for = judge(got.providers, name)
            return Op(0.0, ok, local=got.cached, dead_share=share, dead_for=dead_for, age=got.age)

        return lambda: timed(op, args.deadline)

    def record_get(reader: Worker, target: Worker) -> Callable[[], Awaitable[Op]]:
        async def op() -> Op:
            wanted = (
                target
                if target.alive and target.listed
                else pick_alive(rng, workers, reader, listed=True)
            )
            worker_id = wanted.identity.worker_id
            record, hops = await from_live(
                reader, lambda node: node.get_record_report(worker_id), wanted
            )
            ok = record is not None and record.worker_id == wanted.identity.worker_id
            if not ok:
                # Rare (one in 1000 at 10,000 nodes) and not understood yet: say what the
                # target was doing, for the run that explains it.
                logger.warning(
                    "record get of %s found %s after %d hops: target up %s, listed %s, its "
                    "last publish landed %.1f s before (seq %s)",
                    worker_id[:12],
                    "nothing" if record is None else "another record",
                    hops,
                    wanted.alive,
                    wanted.listed,
                    time.monotonic() - wanted.listed_at,
                    wanted.last.seq if wanted.last is not None else None,
                )
            return Op(0.0, ok, hops)

        return lambda: timed(op, args.deadline)

    gets = [tuple(rng.sample(workers, 2)) for _ in range(args.lookups)]
    ops = {
        "service_lookup": await bounded([service_lookup(r, n) for r, n in cold], args.concurrency),
        "record_get": await bounded([record_get(r, t) for r, t in gets], args.concurrency),
    }
    try:
        # A warm discovery is a live agent's, from the cache it filled: readers down now are
        # not asked (a stand-in has no cache: that is a cold lookup), nor those gone since.
        # Filled and asked a few at a time: a cache filled longer than a heartbeat ago is cold
        # again by design, and filling all of --lookups first took longer than that.
        up = [(r, n) for r, n in pairs if r.alive]
        warm = rng.sample(up, min(args.lookups, len(up)))
        chunk = WARM_CHUNK * args.concurrency
        ops["warm_discover"] = []
        for start in range(0, len(warm), chunk):
            some = warm[start : start + chunk]
            await bounded([warm_discover(r, n) for r, n in some], args.concurrency)  # fills
            ops["warm_discover"] += await bounded(
                [warm_discover(r, n) for r, n in some if r.alive], args.concurrency
            )
    finally:
        await asyncio.gather(*(cache.aclose() for cache in caches.values()))
    return ops


# The stock library.


async def run_stock(
    args: argparse.Namespace, profile: Profile, value_size: int, watch: Watch
) -> Run:
    """The same plan on `kademlia.network.Server` as it ships: all servers, `set` and `get`."""
    run = Run("stock")
    network = EmulatedNetwork(profile, seed=args.seed, uplink=args.uplink)
    watch.follow(run, network)
    rng = random.Random(args.seed)
    nodes: list[StockServer] = []
    started = time.monotonic()
    try:
        names = services(args)
        for i in range(args.nodes):
            node = StockServer(network.add_host())
            await node.listen()
            nodes.append(node)
            role = "coordinator" if i < args.coordinators else "server"
            worker = Worker(node, node.host, Identity.generate(), names[i % len(names)], role)
            worker.port = node.address[1]
            worker.key = f"worker:{worker.identity.worker_id}"
            worker.value = rng.randbytes(value_size)
            run.workers.append(worker)

        async def join(i: int) -> bool:
            seeds = [nodes[j].address for j in rng.sample(range(min(i, args.coordinators)), 1)]
            if i > args.coordinators:
                seeds.append(nodes[rng.randrange(args.coordinators, i)].address)
            return bool(await nodes[i].bootstrap(seeds))

        joined = await bounded([partial(join, i) for i in range(1, args.nodes)], args.join_parallel)
        run.build_s = time.monotonic() - started
        run.join_failures = joined.count(False)
        frozen(args)

        async def store(worker: Worker) -> None:
            if not await worker.node.set(worker.key, worker.value):
                raise OSError("no node stored the value")

        async def lookups() -> dict[str, list[Op]]:
            return {"record_get": await stock_gets(run.workers, args)}

        seeds, seed = [n.address for n in nodes[: args.coordinators]], args.seed

        async def depart(worker: Worker, crash: bool) -> None:
            # The stock library has no tombstone: a leave is a crash.
            worker.saved = {"neighbors": worker.node.bootstrappable_neighbors()}
            worker.host.crash()
            worker.node.stop()

        async def restart(worker: Worker) -> bool | None:
            node = StockServer(worker.host, node_id=worker.node.node.id)
            await node.listen(worker.port)
            via = False
            for peers in (worker.saved["neighbors"], seeds):
                if peers and await node.bootstrap(peers):
                    break
                via = True
            else:
                node.stop()
                return None
            worker.node = node
            nodes.append(node)
            return via

        model = session_model(args)
        churn = churn_of(model, depart, restart, store, seed)
        await measure(run, network, store, lookups, args, churn)
    finally:
        for node in nodes:
            node.stop()
    return run


async def stock_gets(workers: list[Worker], args: argparse.Namespace) -> list[Op]:
    """Gets of random workers' keys from random readers that do not hold the key themselves
    (the stock get answers from its own storage without asking anyone when it can; ours
    always asks the network), unless every node holds it (counted as local)."""
    rng = random.Random(args.seed + 1)

    def holds(reader: Worker, target: Worker) -> bool:
        return reader.node.storage.get(digest(target.key)) is not None

    def draw() -> tuple[Worker, Worker]:
        target = pick_alive(rng, workers, listed=True)
        readers = [w for w in workers if w.alive and w is not target and not holds(w, target)]
        return rng.choice(readers) if readers else pick_alive(rng, workers, target), target

    def get(reader: Worker, target: Worker) -> Callable[[], Awaitable[Op]]:
        async def op() -> Op:
            ready = reader.alive and target.alive and target.listed
            asker, wanted = (reader, target) if ready else draw()
            local = holds(asker, wanted)
            value = await asker.node.get(wanted.key)
            return Op(0.0, value == wanted.value, local=local)

        return lambda: timed(op, args.deadline)

    pairs = [draw() for _ in range(args.lookups)]  # drawn again at their turn if one is down
    return await bounded([get(r, t) for r, t in pairs], args.concurrency)


def record_size(args: argparse.Namespace) -> int:
    """Bytes of one worker's value under `worker:<id>`, for the stock values."""
    record = make_record(Identity.generate(), services=("svc-0",), ttl=args.heartbeat * 3)
    return len(encode_value(f"worker:{record.worker_id}", [record]))


# The command.


def clock_line(args: argparse.Namespace) -> str:
    """Which clock the run is on, in words."""
    if args.virtual:
        return "virtual clock: time jumps to the next event, callbacks take no time"
    if args.dilate > 1:
        return (
            f"real clock dilated {args.dilate:g}x: one event loop, each of its seconds "
            f"{args.dilate:g} real ones, its lateness (on its clock) in every figure"
        )
    return "real clock: one event loop, its lateness in every figure"


async def walled(run: Awaitable[Run]) -> Run:
    """Await one implementation's run, noting the wall and loop seconds it took and the
    process's peak RSS."""
    loop = asyncio.get_running_loop()
    wall, simulated = time.perf_counter(), loop.time()
    try:
        done = await run
    finally:
        gc.unfreeze()
    done.extra |= {
        "wall_s": round(time.perf_counter() - wall, 1),
        "loop_s": round(loop.time() - simulated, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pid": os.getpid(),  # with --jobs 2, ours and the stock library's differ
    }
    return done


def frozen(args: argparse.Namespace) -> None:
    """With --gc-freeze, move what exists now out of the garbage collector's reach: a full
    collection over thousands of nodes stops the shared loop for a second."""
    if args.gc_freeze:
        gc.collect()
        gc.freeze()


async def main_async(args: argparse.Namespace) -> int:
    """Run ours, then the stock library (either skipped on request), and report."""
    profile = PROFILES[args.profile]
    print(profile.describe(), f"({clock_line(args)})", flush=True)
    watch = Watch(args.progress)
    with watch.ticking():
        runs = [] if args.no_ours else [await walled(run_ours(args, profile, watch))]
        if not args.no_stock:
            runs.append(await walled(run_stock(args, profile, record_size(args), watch)))
    publish(args, profile, report.figures(runs, args))
    return 0


def publish(args: argparse.Namespace, profile: Profile, figures: dict[str, Any]) -> None:
    """Print the tables and write the JSON (`--out`)."""
    print(report.render(figures, profile))
    if args.out:
        write_json(
            Path(args.out),
            {
                "profile": profile.as_dict(),
                "profile_line": profile.describe(),
                "clock": report.clock_name(args),
                "options": vars(args),
                "machine": machine("kademlia", "rpcudp"),
                "figures": figures,
            },
        )


def run_split(argv: Sequence[str], args: argparse.Namespace) -> int:
    """`--jobs 2`: ours and the stock library as two runs of this command at once, a core
    each, then one report of both. Each run keeps its own clock (virtual or dilated), so
    neither's figures carry the other's CPU; their progress lines share stderr."""
    profile = PROFILES[args.profile]
    print(profile.describe(), f"({clock_line(args)})", flush=True)
    alone = {"ours": "--no-stock", "stock": "--no-ours"}
    with tempfile.TemporaryDirectory(prefix="field-bench-") as tmp:
        outs = {impl: Path(tmp) / f"{impl}.json" for impl in alone}
        # Later options win in argparse, so the child's own come last.
        children = {
            impl: subprocess.Popen(
                [sys.executable, __file__, *argv, "--jobs", "1", flag, "--out", str(outs[impl])],
                stdout=subprocess.DEVNULL,
            )
            for impl, flag in alone.items()
        }
        try:
            failed = [impl for impl, child in children.items() if child.wait() != 0]
        finally:
            for child in children.values():
                if child.poll() is None:
                    child.terminate()
                    child.wait()
        if failed:
            print(f"field_bench: the {' and '.join(failed)} run failed", file=sys.stderr)
            return 1
        figures = {
            impl: figure
            for out in outs.values()
            for impl, figure in json.loads(out.read_text())["figures"].items()
        }
    publish(args, profile, figures)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="world")
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--clients", type=float, default=0.8, help="share of nodes in client mode")
    parser.add_argument("--coordinators", type=int, default=3)
    parser.add_argument("--services", type=int, default=4)
    parser.add_argument("--lookups", type=int, default=400, help="of each kind")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--join-parallel", type=int, default=16)
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds")
    parser.add_argument("--window", type=float, default=60.0, help="steady window, seconds")
    parser.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="seconds of heartbeats (and churn) between the first publishes and the window: "
        "the trie settles after every worker published at once",
    )
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="per lookup")
    parser.add_argument(
        "--uplink",
        type=float,
        help="every host's line out, bytes/s (a 0.2 s buffer, then drops; default: no limit). "
        "Without one, the stock library's STORE storm can grow without bound on the virtual "
        "clock (datagrams and CPU cost no simulated time)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--progress",
        type=float,
        default=60.0,
        help="wall seconds between progress lines on stderr (0: only at each phase's end)",
    )
    parser.add_argument(
        "--session-median", type=float, default=1800.0, help="churn: median session, seconds"
    )
    parser.add_argument("--session-dist", choices=("weibull", "lognormal"), default="weibull")
    parser.add_argument("--no-churn", action="store_true", help="every worker stays up")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock library")
    parser.add_argument("--no-ours", action="store_true", help="skip our DHT (the stock run only)")
    parser.add_argument(
        "--virtual",
        action="store_true",
        help="run on a virtual clock (dht_bridge.netem.clock): time jumps to the next event, "
        "so the figures carry no loop lateness and sizes past real time fit",
    )
    parser.add_argument(
        "--dilate",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="real time slowed FACTOR times (dht_bridge.netem.clock.DilatedClockLoop): every "
        "delay and timer lasts FACTOR times longer, so one loop has FACTOR times the CPU per "
        "second; the real-time reference at sizes one core cannot carry",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() the built network, so full collections skip it (large runs)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: ours and the stock library each in a process of its own, at once (a core "
        "each), merged into one table and JSON; halves a large run's wall time",
    )
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.coordinators < 1 or args.nodes <= args.coordinators:
        print("--nodes must exceed --coordinators (at least 1)", file=sys.stderr)
        return 2
    if args.no_ours and args.no_stock:
        print("--no-ours and --no-stock leave nothing to run", file=sys.stderr)
        return 2
    if args.dilate < 1 or (args.virtual and args.dilate > 1):
        print("--dilate takes a factor of at least 1, and not with --virtual", file=sys.stderr)
        return 2
    if args.jobs == 2 and not (args.no_ours or args.no_stock):
        return run_split(sys.argv[1:] if argv is None else argv, args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The stock library logs every RPC at INFO and every timeout at ERROR: counted, not printed.
    counter = RawLogCounter()
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("rpcudp.protocol", "asyncio"):
        logging.getLogger(name).addFilter(counter)
    if args.virtual:
        return run_virtual(main_async(args))
    if args.dilate > 1:
        return run_dilated(main_async(args), factor=args.dilate)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
