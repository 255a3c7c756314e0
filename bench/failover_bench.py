"""Benchmark of a failover: time from killing the registry's primary to the first successful
registration after it, on a Sentinel deployment and on a Redis Cluster.

For each topology and round, on 127.0.0.1 (redis-server processes from the binary on free ports):

  setup     a fresh topology (primary + replica + 3 Sentinels; or 3 primaries with a replica
            each), a Registry on it (0.5 s timeout, as the fault tests), N records registered
  kill      the primary holding the registry is SIGKILLed; the clock starts
  measure   a writer registers a new signed record every --interval seconds: the figure is the
            time to the first one Redis accepts; also how many attempts failed meanwhile, and
            how many of the N records the promoted replica still holds

Baseline, in the same run: the failure-detection time the topology is configured with (Sentinel
`down-after-milliseconds`, Cluster `cluster-node-timeout`): no failover can start before it, so
`x_detection` says how much the election, promotion and our client's reconnection add on top.

    .venv/bin/python bench/failover_bench.py --rounds 3 --out bench/results/failover.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, machine, markdown_table, write_json

from dht_bridge.errors import RegistryError
from dht_bridge.registry.registry import Registry, open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from tests.support.helpers import make_record
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import (
    CLUSTER_NODE_TIMEOUT_MS,
    SENTINEL_DOWN_AFTER_MS,
    ClusterTopology,
    SentinelTopology,
)

logger = logging.getLogger("failover_bench")

DEFAULT_OUT = ROOT / "bench" / "results" / "failover.json"
REDIS_TIMEOUT = 0.5
Topology = SentinelTopology | ClusterTopology


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topologies", nargs="+", default=["sentinel", "cluster"])
    parser.add_argument("--rounds", type=int, default=3, help="failovers per topology")
    parser.add_argument("--records", type=int, default=200, help="records registered first")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between attempts")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds per failover")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def start_topology(kind: str, workdir: Path) -> Topology:
    """A fresh topology of `kind`, started and ready to fail over."""
    topology: Topology = (
        SentinelTopology(workdir) if kind == "sentinel" else ClusterTopology(workdir)
    )
    topology.start()
    return topology


def primary_of(topology: Topology, registry: Registry) -> RedisServer:
    """The data server holding the registry now."""
    if isinstance(topology, ClusterTopology):
        return topology.master_for(registry.held_key)
    primary = topology.primary()
    if primary is None:
        raise RuntimeError("the Sentinels agree on no primary")
    return primary


async def one_failover(topology: Topology, args: argparse.Namespace) -> dict[str, Any]:
    """Register N records, kill the primary, time the first registration accepted after."""
    settings = RegistrySettings(redis_url=topology.url, timeout=REDIS_TIMEOUT)
    policy = TunnelPolicy()
    async with open_registry(settings, policy=policy) as registry:
        batch = [make_record(ttl=600.0) for _ in range(args.records)]
        await registry.upsert_many(batch)
        # Let the replica catch up, so that "records kept" measures the failover, not the load.
        if isinstance(topology, ClusterTopology):
            topology.wait_healthy()
        else:
            topology.wait_ready()
        primary = primary_of(topology, registry)
        primary.kill()
        killed = time.monotonic()
        failed = 0
        deadline = killed + args.deadline
        while True:
            try:
                await registry.upsert(make_record())
                break
            except RegistryError:
                failed += 1
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no registration within {args.deadline} s") from None
                await asyncio.sleep(args.interval)  # the attempt rate, not synchronisation
        took = time.monotonic() - killed
        kept = sum(
            1
            for record in await registry.records(limit=args.records * 2)
            if record.worker_id in {r.worker_id for r in batch}
        )
    return {"first_registration_s": round(took, 3), "failed_attempts": failed, "kept": kept}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every round of every topology; a summary per topology."""
    detection = {
        "sentinel": SENTINEL_DOWN_AFTER_MS / 1000,
        "cluster": CLUSTER_NODE_TIMEOUT_MS / 1000,
    }
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rma-failover-") as tmp:
        for kind in args.topologies:
            rounds = []
            for index in range(args.rounds):
                topology = start_topology(kind, Path(tmp) / f"{kind}-{index}")
                try:
                    rounds.append(await one_failover(topology, args))
                finally:
                    topology.stop()
                print(f"{kind} round {index + 1}: {rounds[-1]}", file=sys.stderr)
            times = [r["first_registration_s"] for r in rounds]
            summary[kind] = {
                "rounds": rounds,
                "median_s": round(statistics.median(times), 3),
                "max_s": max(times),
                "detection_s": detection[kind],
                "x_detection": round(statistics.median(times) / detection[kind], 2),
                "kept_min": min(r["kept"] for r in rounds),
            }
    return summary


def report(summary: dict[str, Any], records: int) -> None:
    """The table on stdout."""
    header = (
        *("topology", "first registration after kill, median / max s", "detection floor s"),
        *("x floor", f"records kept of {records} (worst round)"),
    )
    rows = [
        [
            *(kind, f"{row['median_s']:.2f} / {row['max_s']:.2f}", f"{row['detection_s']:.1f}"),
            *(f"{row['x_detection']:.2f}", row["kept_min"]),
        ]
        for kind, row in summary.items()
    ]
    print(markdown_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    """Run, print, write JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    summary = asyncio.run(run(args))
    report(summary, args.records)
    write_json(args.out, {"args": vars(args), "machine": machine(), "topologies": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
