"""Benchmark of the worker agent in steady state: edge requests and DHT traffic per worker.

The parent runs the edge router (real HTTP under uvicorn, embedded registry) and a few
coordinator DHT nodes; child processes (`--procs`, one event loop each) run the worker agents,
each with its own DHT node on 127.0.0.1. Every worker joins through the router (one
`GET /dht/bootstrap`), then all heartbeat over the DHT for a measured window. Afterwards one
worker per process restarts from its state file, to count the edge requests of a restart.

The baseline, measured in the same run: the same workers in `--edge-only` mode, heartbeating
through the edge every 30 s as every worker does today with the central coordinator.

Intervals are scaled down by `--scale` (heartbeat, lease, bucket refresh, holder cache, retry
delays; not the RPC timeout, which is a network property) and the figures converted back to the
real 30 s heartbeat / 90 s lease: traffic per heartbeat is the same, so per-second and per-day
figures are the measured ones divided by the scale.

The run's parts: worker_bench_plan.py (intervals and each worker's configuration),
worker_bench_child.py (a child process of agents), worker_bench_report.py (figures and tables).

    .venv/bin/python bench/worker_bench.py --workers 20 200 --procs 4 --scale 5 \\
        --out bench/results/worker.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from common import ChildProcess, machine, write_json
from worker_bench_child import child_main
from worker_bench_plan import JOIN_PARALLEL, REAL_HEARTBEAT, SERVICES, STREAM_LIMIT, dht_settings
from worker_bench_plan import shares as plan_shares
from worker_bench_report import TARGETS, print_report, summarise

from dht_bridge.dht.node import DHTNode
from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from edge_router.app import create_app
from edge_router.config import RouterConfig
from tests.support.dht import start_node, stop_all
from tests.support.upstreams import serve

logger = logging.getLogger("worker_bench")

SCRIPT = Path(__file__).resolve()
CHILD_TIMEOUT = 600.0
# The joins of a child may take this long per worker on top of CHILD_TIMEOUT (paced joins).
JOIN_TIMEOUT_PER_WORKER = 1.0


@contextlib.asynccontextmanager
async def edge_router(coordinators: list[DHTNode]) -> AsyncIterator[tuple[str, Any]]:
    """The router app on an OS port over the embedded registry; its URL and state."""
    config = RouterConfig(coordinators=tuple(node.address for node in coordinators))
    registry = open_registry(RegistrySettings(), policy=TunnelPolicy())
    app = create_app(config, registry=registry, listen_events=False)
    try:
        async with app.router.lifespan_context(app), serve(app) as url:
            yield url, app.state.rma
    finally:
        await registry.aclose()


@contextlib.asynccontextmanager
async def coordinator_nodes(args: argparse.Namespace) -> AsyncIterator[list[DHTNode]]:
    """`--coordinators` DHT nodes joined to the first, closed on exit."""
    settings = dht_settings(args.scale, worker=False)
    nodes: list[DHTNode] = []
    try:
        for _ in range(args.coordinators):
            seeds = [node.address for node in nodes[:1]]
            nodes.append(await start_node(settings=settings, seeds=seeds))
        yield nodes
    finally:
        await stop_all(nodes)


def _router_requests(state: Any) -> int:
    return sum(n for (klass, _), n in state.metrics.requests.items() if klass != "health")


async def measure(
    n: int,
    args: argparse.Namespace,
    edge_url: str,
    router: Any,
    coordinators: list[DHTNode],
    *,
    edge_only: bool,
) -> dict[str, Any]:
    """Run `n` workers over the children: join, a steady window, (a restart), stop."""
    scale = args.scale
    window = (args.baseline_window if edge_only else args.window) / scale
    shares = plan_shares(n, args.procs)
    procs = len(shares)
    kind = "edge-only baseline" if edge_only else "agent"
    with tempfile.TemporaryDirectory(prefix="worker-bench-") as workdir:
        children: list[ChildProcess] = []
        first = 0
        for share in shares:
            child_args = [
                *("--log-level", args.log_level, "--edge", edge_url, "--scale", str(scale)),
                *("--workdir", workdir, "--first", str(first), "--count", str(share)),
                *(["--edge-only"] if edge_only else []),
                *(["--holder-cache", str(args.holder_cache)] if args.holder_cache else []),
                *("--services", str(args.services)),
                *(["--no-gc-freeze"] if args.no_gc_freeze else []),
                *("--join-parallel", str(args.join_parallel), "--join-lag", str(args.join_lag)),
            ]
            name = f"the child of workers {first} to {first + share - 1}"
            children.append(await ChildProcess.spawn(name, SCRIPT, *child_args, limit=STREAM_LIMIT))
            first += share

        async def each(op: str, per_worker: float = 0.0) -> list[dict[str, Any]]:
            """`op` to every child at once (each given `per_worker` seconds more per worker)."""
            answers = await asyncio.gather(
                *(
                    child.ask(op, timeout=CHILD_TIMEOUT + per_worker * share)
                    for child, share in zip(children, shares, strict=True)
                )
            )
            return [answer["result"] for answer in answers]

        try:
            joined = await each("join", JOIN_TIMEOUT_PER_WORKER)
            logger.info("%d workers (%s) joined; steady window %.1fs", n, kind, window)
            # Let the joins' own traffic (crawls, first stores) settle for one heartbeat.
            await asyncio.sleep(REAL_HEARTBEAT / scale)
            coord_before = sum(_node_bytes(node) for node in coordinators)
            router_before = _router_requests(router)
            await each("window_start")
            started = time.monotonic()
            parent_cpu = time.process_time()
            await asyncio.sleep(window)
            ends = await each("window_end")
            elapsed = time.monotonic() - started
            parent_cpu = time.process_time() - parent_cpu
            coord_bytes = sum(_node_bytes(node) for node in coordinators) - coord_before
            router_seen = _router_requests(router) - router_before
            restarts = [] if edge_only else await each("restart")
            await each("stop")
        finally:
            for child in children:
                await child.wait_or_kill(30)
    row = summarise(
        n,
        procs,
        scale,
        joined,
        ends,
        restarts,
        elapsed,
        coord_bytes,
        router_seen,
        edge_only,
        len(coordinators),
        parent_cpu / elapsed,
    )
    row["join_parallel"] = args.join_parallel
    row["join_lag_ms"] = args.join_lag
    return row


def _node_bytes(node: DHTNode) -> int:
    stats = node.rpc.stats
    return int(stats.bytes_in + stats.bytes_out)


async def parent_main(args: argparse.Namespace) -> int:
    """Coordinators and the router here; workers in children; table and JSON at the end."""
    rows: list[dict[str, Any]] = []
    for n in args.workers:
        for edge_only in (False, True):
            if edge_only and args.no_baseline:
                continue
            # Fresh coordinators and router for every run: the last run's workers are gone,
            # and dead contacts would tax the next run's joins.
            async with coordinator_nodes(args) as nodes, edge_router(nodes) as (url, router):
                rows.append(await measure(n, args, url, router, nodes, edge_only=edge_only))
    print_report(rows, args.scale)
    if args.out:
        out = Path(args.out)
        write_json(
            out,
            {
                "params": {k: v for k, v in vars(args).items() if k not in ("child", "log_level")},
                "targets": TARGETS,
                "machine": machine(),
                "rows": rows,
            },
        )
        print(f"\nwrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Options of the benchmark (and of its children)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--procs", type=int, default=4, help="child processes for the workers")
    parser.add_argument(
        "--scale",
        type=float,
        default=5.0,
        help="intervals divided by this (below 1: slower than real, for more workers than the "
        "cores can run at the real pace; per-heartbeat figures do not depend on the pace)",
    )
    parser.add_argument(
        "--window", type=float, default=360.0, help="steady window, real seconds (4 leases)"
    )
    parser.add_argument(
        "--baseline-window", type=float, default=120.0, help="baseline window, real seconds"
    )
    parser.add_argument("--coordinators", type=int, default=3)
    parser.add_argument(
        "--join-parallel",
        type=int,
        default=JOIN_PARALLEL,
        help="workers joining at a time in each process",
    )
    parser.add_argument(
        "--join-lag",
        type=float,
        default=0.0,
        help="hold new joins while a process's loop runs later than this many ms (0: never); "
        "joins as fast as the CPU allows starve the heartbeats of the workers already in",
    )
    parser.add_argument(
        "--holder-cache",
        type=float,
        help="workers' holder cache TTL, real seconds (default: the worker's, 300)",
    )
    parser.add_argument(
        "--services",
        type=int,
        choices=range(1, len(SERVICES) + 1),
        default=len(SERVICES),
        help=f"services the workers offer, one each in turn (of {', '.join(SERVICES)})",
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the objects the joins made in the children's full garbage collections "
        "(by default frozen: hundreds of agents share a heap there, one per process in "
        "production)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--edge", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--edge-only", action="store_true", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    """Entry point: the parent, or a child when `--child` is given."""
    args = build_parser().parse_args()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {'child' if args.child else 'bench'} %(levelname)s %(name)s: "
        "%(message)s",
        stream=sys.stderr,
    )
    if args.scale <= 0:
        raise SystemExit("--scale must be > 0")
    return asyncio.run(child_main(args) if args.child else parent_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
