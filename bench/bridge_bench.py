"""Benchmark of the bridge: how long Redis takes to converge after a partition heals.

For each record count N, in one run on 127.0.0.1 (this process hosts the DHT network, the
bridge and the observer; redis-server runs in its own process on a free port):

  setup          M DHT nodes (M = min(N, --nodes)) publish N workers' signed records (each node
                 on behalf of several workers); a bridge joins and fills an empty Redis
  dht-partition  the bridge's node is cut off the network (every datagram dropped both ways);
                 once the bridge has noticed, every worker publishes a newer record; the cut is
                 healed and the clock starts: converged when Redis holds all N newer records
  redis-outage   redis-server is killed; every worker publishes a newer record, which the
                 bridge journals; Redis restarts EMPTY and the clock starts: converged when
                 Redis holds all N newest records again (journal replay plus a full pass)

Baseline, measured alongside: one pipelined `Registry.upsert_many` of the same N records into
an empty Redis (the floor for writing them), and one sweep of every shard of the DHT by the
bridge's node (the floor for reading them). Convergence is observed by polling Redis every
--poll seconds, so figures carry that resolution. Prints a table and writes JSON.

    .venv/bin/python bench/bridge_bench.py --records 200 2000 --out bench/results/bridge.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from common import ROOT, machine, text_table, write_json

from dht_bridge.backoff import ExponentialBackoff
from dht_bridge.bridge.bridge import Bridge, BridgeSettings
from dht_bridge.bridge.journal import Journal
from dht_bridge.dht.node import DHTNode
from dht_bridge.errors import PublishError, RegistryError
from dht_bridge.identity import Identity
from dht_bridge.records import WorkerRecord
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import DHTSettings, RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from tests.support.bridge import Partition
from tests.support.dht import start_network, start_node
from tests.support.helpers import make_record, wait_for
from tests.support.redis_server import RedisServer

logger = logging.getLogger("bridge_bench")

DEFAULT_OUT = ROOT / "bench" / "results" / "bridge.json"
SERVICES = ("ocr", "gpu", "asr", "tts")
LEASE = 900.0  # long: no lease may lapse during a run (self-preservation is not measured here)
POLICY = TunnelPolicy()


class Workers:
    """N worker identities and the newest record each has published."""

    def __init__(self, count: int, rng: random.Random) -> None:
        self.identities = [Identity.generate() for _ in range(count)]
        self.services = [
            tuple(sorted(rng.sample(SERVICES, rng.choice((1, 1, 2))))) for _ in range(count)
        ]
        self.seq = 0
        self.rng = rng
        self.records: list[WorkerRecord] = []

    def next_round(self) -> list[WorkerRecord]:
        """Every worker's next record (the next seq), as a heartbeat round would produce."""
        self.seq += 1
        now = time.time()
        self.records = [
            make_record(
                identity,
                services=services,
                seq=self.seq,
                now=now,
                ttl=LEASE,
                load=round(self.rng.random(), 2),
            )
            for identity, services in zip(self.identities, self.services, strict=True)
        ]
        return self.records


PUBLISH_ATTEMPTS = 4


async def publish(nodes: list[DHTNode], records: list[WorkerRecord], concurrency: int) -> int:
    """Publish each record from a node of the network; returns how many publishes were
    retried. Every node shares this one event loop, and a burst beside a busy bridge can time
    out on every holder: the publish is tried again, as a worker would at its next heartbeat."""
    gate = asyncio.Semaphore(concurrency)
    retries = 0

    async def one(index: int, record: WorkerRecord) -> None:
        nonlocal retries
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                async with gate:
                    await nodes[index % len(nodes)].publish(record)
                return
            except PublishError:
                if attempt + 1 == PUBLISH_ATTEMPTS:
                    raise
                retries += 1
                await asyncio.sleep(0.5 * (attempt + 1))  # pacing, not synchronisation

    await asyncio.gather(*(one(i, r) for i, r in enumerate(records)))
    return retries


async def redis_holds(registry: Registry, records: list[WorkerRecord]) -> bool:
    """Does Redis hold every one of these records (or newer)?"""
    try:
        stored = {r.worker_id: r.seq for r in await registry.records(limit=1_000_000)}
    except RegistryError:
        return False
    return all(stored.get(r.worker_id, 0) >= r.seq for r in records)


async def until(
    condition: Callable[[], Awaitable[bool] | bool], *, poll: float, deadline: float, what: str
) -> float:
    """Poll `condition` every `poll` seconds; the seconds until it held (fails after
    `deadline`, naming `what`)."""
    started = time.monotonic()
    await wait_for(condition, timeout=deadline, interval=poll, message=what)
    return time.monotonic() - started


async def measure(count: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every figure for one record count."""
    rng = random.Random(args.seed + count)
    settings = DHTSettings(host="127.0.0.1", port=0, rpc_timeout=args.rpc_timeout)
    server = RedisServer(workdir / f"redis-{count}")
    server.start()
    registry = open_registry(
        RegistrySettings(redis_url=server.url, timeout=args.redis_timeout), policy=POLICY
    )
    nodes: list[DHTNode] = []
    row: dict[str, Any] = {"records": count}
    try:
        nodes += await start_network(min(count, args.nodes), settings=settings)
        first = nodes[0]
        bridge_node = await start_node(settings=settings, seeds=[first.address])
        nodes.append(bridge_node)
        partition = Partition(bridge_node)
        workers = Workers(count, rng)
        workers_nodes = nodes[:-1]  # every node but the bridge's publishes
        row["nodes"] = len(workers_nodes)
        started = time.monotonic()
        retried = await publish(workers_nodes, workers.next_round(), args.concurrency)
        row["publish_round_s"] = round(time.monotonic() - started, 3)

        # Baselines: one pipelined write of every record into an empty Redis, and one sweep
        # of every shard from the bridge's node.
        started = time.monotonic()
        await registry.upsert_many(workers.records)
        row["baseline_write_s"] = round(time.monotonic() - started, 4)
        await registry.client.flushall()
        started = time.monotonic()
        swept = 0
        for service in SERVICES:
            swept += len(await bridge_node.service_records(service))
        row["baseline_sweep_s"] = round(time.monotonic() - started, 4)
        row["sweep_records"] = swept

        journal = Journal(workdir / f"journal-{count}.jsonl")
        bridge = Bridge(
            bridge_node,
            registry,
            journal,
            settings=BridgeSettings(
                sync_interval=args.sync_interval,
                probe_interval=args.probe_interval,
                backoff=ExponentialBackoff(base=0.2, cap=args.probe_interval * 2),
            ),
            bootstrap=[first.address],
            services=SERVICES,
            rng=rng,
        )
        deadline = args.deadline
        async with bridge.running():
            row["initial_fill_s"] = round(
                await until(
                    lambda: redis_holds(registry, workers.records),
                    poll=args.poll,
                    deadline=deadline,
                    what="initial fill",
                ),
                3,
            )

            # dht-partition
            partition.cut = True
            row["partition_detect_s"] = round(
                await until(
                    lambda: not bridge.dht_up, poll=0.05, deadline=deadline, what="cut noticed"
                ),
                3,
            )
            newer = workers.next_round()
            retried += await publish(workers_nodes, newer, args.concurrency)
            passes = bridge.counters.syncs
            partition.heal()
            healed = time.monotonic()
            back = await until(lambda: bridge.dht_up, poll=0.01, deadline=deadline, what="back")
            await until(
                lambda: redis_holds(registry, newer),
                poll=args.poll,
                deadline=deadline,
                what="convergence after the DHT partition",
            )
            row["dht_partition"] = {
                "converge_s": round(time.monotonic() - healed, 3),
                "back_s": round(back, 3),
                "passes": bridge.counters.syncs - passes,
            }

            # redis-outage
            server.kill()
            await until(lambda: not bridge.redis_up, poll=0.05, deadline=deadline, what="down")
            newest = workers.next_round()
            retried += await publish(workers_nodes, newest, args.concurrency)
            ids = {r.worker_id for r in newest}

            def journaled() -> bool:
                replay = journal.replay()
                have = {r.worker_id for r in replay.records if r.seq >= workers.seq}
                return ids <= have

            await until(journaled, poll=0.2, deadline=deadline, what="outage journaled")
            passes = bridge.counters.syncs
            replayed = bridge.counters.replayed
            server.start()  # empty
            restarted = time.monotonic()
            await until(
                lambda: redis_holds(registry, newest),
                poll=args.poll,
                deadline=deadline,
                what="convergence after the Redis outage",
            )
            converged = round(time.monotonic() - restarted, 3)
            # Redis can hold them all a moment before the bridge has counted the replay.
            await until(lambda: bridge.redis_up, poll=0.01, deadline=deadline, what="recovered")
            row["redis_outage"] = {
                "converge_s": converged,
                "replayed": bridge.counters.replayed - replayed,
                "passes": bridge.counters.syncs - passes,
            }
        journal.close()
        row["publish_retries"] = retried
        write = max(row["baseline_write_s"], 1e-4)
        for scenario in ("dht_partition", "redis_outage"):
            row[scenario]["x_baseline_write"] = round(row[scenario]["converge_s"] / write, 1)
        row["figures"] = {
            k: v
            for k, v in bridge.figures().items()
            if k.endswith("_total") and not k.endswith("timestamp")
        }
        return row
    finally:
        for node in nodes:
            await node.aclose()
        await registry.aclose()
        server.kill()


TABLE_COLUMNS = (
    *(("records", ">7"), ("nodes", ">5"), ("scenario", "<14"), ("converge s", ">10")),
    *(("passes", ">6"), ("write s", ">8"), ("sweep s", ">8"), ("x write", ">8")),
)


def table(rows: list[dict[str, Any]]) -> str:
    """The figures as a fixed-width table."""
    return text_table(
        TABLE_COLUMNS,
        (
            [
                *(row["records"], row["nodes"], scenario, f"{row[scenario]['converge_s']:.3f}"),
                *(row[scenario]["passes"], f"{row['baseline_write_s']:.3f}"),
                f"{row['baseline_sweep_s']:.3f}",
                f"{row[scenario]['x_baseline_write']:.1f}",
            ]
            for row in rows
            for scenario in ("dht_partition", "redis_outage")
        ),
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every record count, one after the other, within the time limit."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bridge-bench-") as tmp:
        async with asyncio.timeout(args.time_limit):
            for count in args.records:
                logger.info("measuring %d records", count)
                rows.append(await measure(count, args, Path(tmp)))
    return {
        "params": {
            "records": args.records,
            "nodes": args.nodes,
            "sync_interval": args.sync_interval,
            "probe_interval": args.probe_interval,
            "rpc_timeout": args.rpc_timeout,
            "poll": args.poll,
            "seed": args.seed,
            "method": (
                "converge_s runs from the heal (partition) or the restart of an empty Redis "
                "(outage) until Redis holds every worker's newest record, observed by polling "
                "Redis every `poll` seconds; x_baseline_write is converge_s over one pipelined "
                "upsert_many of the same records into an empty Redis"
            ),
        },
        "machine": machine(),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--nodes", type=int, default=60, help="DHT nodes at most")
    parser.add_argument("--sync-interval", type=float, default=10.0)
    parser.add_argument("--probe-interval", type=float, default=1.0)
    parser.add_argument("--rpc-timeout", type=float, default=0.5)
    parser.add_argument("--redis-timeout", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=32, help="publishes in flight")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between Redis checks")
    parser.add_argument("--deadline", type=float, default=120.0, help="per phase, seconds")
    parser.add_argument("--time-limit", type=float, default=1200.0, help="whole run, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    results = asyncio.run(run(args))
    print(table(results["rows"]))
    write_json(args.out, results)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
