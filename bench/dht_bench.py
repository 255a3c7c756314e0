"""Benchmark of the DHT alone: our DHTNode against the stock `kademlia.network.Server`.

Both run the same plan in the same invocation: build a network (node 0 the seed, every
other node joining through the seed plus one or two earlier nodes), store keys, time gets
of random keys from random readers, kill a share of the nodes without warning, and time the
gets again. Nodes are spread over child processes, each with its own event loop, so that
one loop does not set the pace. Prints a table and ours/raw ratios; writes a JSON file.

    .venv/bin/python bench/dht_bench.py --nodes 200 --procs 4 --lookups 400 --kill 0.2 \\
        --impl both --out bench/results/dht-200.json

With `--servers 0.2`, a mixed network: 20% of our nodes in server mode, the rest in client mode
(workers behind NAT: they look up and publish through servers, and nobody contacts them); the
stock library, which has no client mode, runs all-server on the same plan. Readers are drawn
from every node, so lookups start from servers and clients alike. Each row then also counts
clients found in servers' routing tables and requests that reached a client (both must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dht_bench_report as report
from common import BenchError, ChildProcess, HelpFormatter, machine, write_json
from dht_bench_plan import PHASES, SERVICES, Plan, PlanOptions, build_plan

logger = logging.getLogger("dht_bench")

SCRIPT = Path(__file__).resolve()
DEFAULT_DEADLINE = 30.0
DEFAULT_TIME_LIMIT = 1800.0
STREAM_LIMIT = 1 << 26
PROGRESS_EVERY = 2.0
IMPLS = ("ours", "raw")


class Budget:
    """The run's overall time limit, shared by every phase."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left (at most `cap`); BenchError once the limit has passed."""
        left = self.ends - time.monotonic()
        if left <= 0:
            raise BenchError(f"time limit of {self.seconds:.0f}s reached")
        return left if cap is None else min(cap, left)


class Progress:
    """Logs `label: done/total` every few seconds while children report progress."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.done: dict[str, int] = {}
        self.started = time.monotonic()
        self.last = self.started

    def update(self, source: str, done: int) -> None:
        """A child (or the parent) reports how many of its items are done."""
        self.done[source] = done
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            done = sum(self.done.values())
            logger.info("%s: %d/%d (%.0fs)", self.label, done, self.total, now - self.started)


class Child(ChildProcess):
    """One child process hosting a share of the nodes."""

    async def call(
        self,
        op: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the bound of one command, passed down explicitly
        progress: Progress | None = None,
        **args: Any,
    ) -> Any:
        """Send one command and wait for its reply, relaying progress lines."""
        await self.send({"op": op, "args": args})
        try:
            async with asyncio.timeout(timeout):
                while (message := await self.receive(op))["type"] == "progress":
                    if progress is not None:
                        progress.update(self.name, message["done"])
        except TimeoutError:
            raise BenchError(f"{self.name}: {op} took over {timeout:.0f}s") from None
        if not message["ok"]:
            raise BenchError(f"{self.name}: {op} failed: {message['error']}")
        return message["result"]

    async def close(self) -> None:
        """Ask the child to close its nodes and exit; kill it if it does not."""
        try:
            if self.process.returncode is None:
                await self.call("shutdown", timeout=20)
        except (BenchError, BrokenPipeError, ConnectionResetError) as exc:
            logger.warning("%s did not shut down cleanly (%s); killing it", self.name, exc)
            await self.wait_or_kill(0)
        await self.wait_or_kill(10)


async def call_each(
    children: Sequence[Child],
    op: str,
    per_child: dict[int, dict[str, Any]],
    *,
    timeout: float,  # noqa: ASYNC109 - the bound of one command, passed down explicitly
    progress: Progress | None = None,
) -> dict[int, Any]:
    """The same command to several children at once, each with its own arguments."""
    replies = await asyncio.gather(
        *(
            children[p].call(op, timeout=timeout, progress=progress, **args)
            for p, args in per_child.items()
        )
    )
    return dict(zip(per_child, replies, strict=True))


class ImplRun:
    """One implementation through the whole plan, in its own fresh child processes."""

    def __init__(self, impl: str, plan: Plan, args: argparse.Namespace, budget: Budget) -> None:
        self.impl = impl
        self.plan = plan
        self.args = args
        self.budget = budget
        self.children: list[Child] = []
        self.addrs: dict[int, list[Any]] = {}
        self.build: dict[str, Any] = {}
        self.store: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {}
        self.idle: dict[str, Any] = {}

    async def run(self) -> None:
        """Spawn, build, store, read, kill, read again; always stop the children."""
        started = time.monotonic()
        procs = self.plan.options.procs
        self.children = list(await asyncio.gather(*(self._spawn(p) for p in range(procs))))
        try:
            await call_each(self.children, "hello", {p: {} for p in range(procs)}, timeout=60)
            await self._create()
            await self._build()
            await self._store()
            await self._idle()
            for phase in PHASES:
                if phase == "after":
                    await self._kill()
                await self._measure(phase)
        finally:
            await asyncio.gather(*(child.close() for child in self.children))
        self.stats["wall_s"] = time.monotonic() - started
        logger.info("%s: done in %.1fs", self.impl, self.stats["wall_s"])

    async def _spawn(self, proc: int) -> Child:
        args = ("--impl", self.impl, "--proc", str(proc), "--log-level", self.args.child_log_level)
        return await Child.spawn(f"child {proc}", SCRIPT, *args, limit=STREAM_LIMIT)

    def _by_proc(self, indices: Sequence[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        for index in indices:
            groups[self.plan.proc_of(index)].append(index)
        return groups

    async def _create(self) -> None:
        groups = self._by_proc(range(self.plan.options.nodes))
        clients = [i for i in range(self.plan.options.nodes) if i not in self.plan.servers]
        client_ids = [self.plan.node_ids[i].hex() for i in clients]
        per_child = {
            p: {
                "nodes": [
                    [i, self.plan.node_ids[i].hex(), i not in self.plan.servers] for i in indices
                ],
                "client_ids": client_ids,
            }
            for p, indices in groups.items()
        }
        replies = await call_each(
            self.children, "create", per_child, timeout=self.budget.remaining(300)
        )
        for reply in replies.values():
            self.addrs.update({int(i): addr for i, addr in reply["addrs"].items()})

    async def _build(self) -> None:
        """Join the nodes round by round; a round's nodes join at once, across processes."""
        logger.info("%s: building a network of %d nodes", self.impl, self.plan.options.nodes)
        progress = Progress(f"{self.impl}: nodes joined", self.plan.options.nodes - 1)
        results: list[Any] = []
        started = time.perf_counter()
        for steps in self.plan.rounds:
            per_child: dict[int, dict[str, Any]] = defaultdict(self._join_args)
            for index, peers in steps:
                per_child[self.plan.proc_of(index)]["steps"].append(
                    [index, [self.addrs[p] for p in peers]]
                )
            replies = await call_each(
                self.children,
                "join",
                dict(per_child),
                timeout=self.budget.remaining(self.args.deadline * 4),
            )
            for reply in replies.values():
                results.extend(reply)
            progress.update("parent", len(results))
        self.build = report.join_figures(results, time.perf_counter() - started)
        logger.info(
            "%s: built in %.1fs, %d join failures",
            self.impl,
            self.build["build_s"],
            self.build["join_failures"],
        )

    async def _store(self) -> None:
        keys = self.plan.keys
        logger.info("%s: storing %d keys", self.impl, len(keys))
        per_child: dict[int, dict[str, Any]] = {}
        for key in keys:
            p = self.plan.proc_of(key.writer)
            item = {"node": key.writer, **key.wire()}
            per_child.setdefault(p, self._bounded_args())["items"].append(item)
        replies = await call_each(
            self.children,
            "store",
            per_child,
            timeout=self.budget.remaining(),
            progress=Progress(f"{self.impl}: keys stored", len(keys)),
        )
        results = [r for reply in replies.values() for r in reply]
        self.store = report.store_figures(results)
        logger.info("%s: stored %d/%d keys", self.impl, self.store["stored"], len(keys))

    def _join_args(self) -> dict[str, Any]:
        return {"steps": [], "parallel": self.args.join_parallel, "deadline": self.args.deadline}

    def _bounded_args(self) -> dict[str, Any]:
        return {
            "items": [],
            "concurrency": self.args.concurrency,
            "deadline": self.args.deadline,
        }

    async def _idle(self) -> None:
        """Traffic of the idle network with the keys stored: the stock library's STORE loop
        (KADEMLIA_NOTES 5) shows up here, and it also inflates its packets per lookup."""
        if self.args.idle <= 0:
            self.idle = {"idle_bytes_per_node_s": None, "idle_pkts_per_node_s": None}
            return
        logger.info("%s: idle traffic for %.0fs", self.impl, self.args.idle)
        before = await self._stats()
        started = time.monotonic()
        await asyncio.sleep(self.args.idle)
        after = await self._stats()
        node_seconds = after["alive_nodes"] * (time.monotonic() - started)
        self.idle = {
            "idle_bytes_per_node_s": (after["bytes_out"] - before["bytes_out"]) / node_seconds,
            "idle_pkts_per_node_s": (after["packets_out"] - before["packets_out"]) / node_seconds,
        }

    async def _lookups(self, label: str, lookups: Sequence[Any]) -> list[Any]:
        per_child: dict[int, dict[str, Any]] = {}
        for lookup in lookups:
            p = self.plan.proc_of(lookup.reader)
            per_child.setdefault(p, self._bounded_args())["items"].append(
                lookup.wire(self.plan.keys)
            )
        replies = await call_each(
            self.children,
            "lookup",
            per_child,
            timeout=self.budget.remaining(),
            progress=Progress(f"{self.impl}: {label}", len(lookups)),
        )
        return [r for reply in replies.values() for r in reply]

    async def _stats(self) -> dict[str, Any]:
        procs = self.plan.options.procs
        replies = await call_each(self.children, "stats", {p: {} for p in range(procs)}, timeout=60)
        stats = list(replies.values())
        nodes = sum(s["nodes"] for s in stats)
        stored = [b for s in stats for b in s["stored_bytes"]] or [0]
        return {
            "mem_per_node_kb": sum(s["rss_kb"] - s["baseline_kb"] for s in stats) / nodes,
            # Value bytes each live node holds for others (the DHT's storage, not its RSS).
            "stored_kb_mean": sum(stored) / len(stored) / 1024,
            "stored_kb_max": max(stored) / 1024,
            "rss_kb": [s["rss_kb"] for s in stats],
            "baseline_kb": [s["baseline_kb"] for s in stats],
            "packets_out": sum(s["packets_out"] for s in stats),
            "bytes_out": sum(s["bytes_out"] for s in stats),
            "rpc_timeouts": sum(s["rpc_timeouts"] for s in stats),
            "alive_nodes": sum(s["alive"] for s in stats),
            "stored_but_reported_not": sum(s.get("stored_but_reported_not", 0) for s in stats),
            "contacts_mean": sum(s["contacts_mean"] * s["alive"] for s in stats)
            / max(1, sum(s["alive"] for s in stats)),
            "clients_in_tables": sum(s.get("clients_in_tables", 0) for s in stats),
            "requests_to_clients": sum(s.get("requests_to_clients", 0) for s in stats),
        }

    async def _measure(self, phase: str) -> None:
        """Gets (and, for ours, service lookups) of one phase, with traffic and memory."""
        label = "before churn" if phase == "before" else "after churn"
        logger.info("%s: lookups %s", self.impl, label)
        before = await self._stats()
        started = time.monotonic()
        gets = await self._lookups(f"gets {label}", self.plan.gets[phase])
        gets_s = time.monotonic() - started
        after_gets = await self._stats()
        self.rows.append(self._row(phase, "get", gets, before, after_gets, gets_s))
        if self.impl == "ours" and self.plan.service_gets[phase]:
            started = time.monotonic()
            found = await self._lookups(f"service lookups {label}", self.plan.service_gets[phase])
            found_s = time.monotonic() - started
            after = await self._stats()
            self.rows.append(self._row(phase, "service", found, after_gets, after, found_s))
        for row in self.rows:
            if row["phase"] == phase:
                logger.info(
                    "%s %s, %s: success %.1f%%, p50 %.1f ms, max %.0f ms",
                    *(self.impl, label, row["kind"], row["success_pct"]),
                    *(row["lookup_p50_ms"], row["lookup_max_ms"]),
                )

    def _row(
        self,
        phase: str,
        kind: str,
        results: list[Any],
        before: dict[str, Any],
        after: dict[str, Any],
        seconds: float,
    ) -> dict[str, Any]:
        figures = report.latency_figures(results)
        return {
            "impl": self.impl,
            "phase": phase,
            "kind": kind,
            "nodes": self.plan.options.nodes,
            "procs": self.plan.options.procs,
            **self.build,
            **self.store,
            **self.idle,
            **figures,
            "phase_s": seconds,
            "mem_per_node_kb": after["mem_per_node_kb"],
            "stored_kb_mean": after["stored_kb_mean"],
            "stored_kb_max": after["stored_kb_max"],
            "pkts_per_lookup": (after["packets_out"] - before["packets_out"])
            / max(1, figures["lookups"]),
            "rpc_timeouts": after["rpc_timeouts"] - before["rpc_timeouts"],
            "alive_nodes": after["alive_nodes"],
            # Publishes that landed although PublishReport.stored said False (ours only).
            "publish_false_negatives": after["stored_but_reported_not"],
            "contacts_mean": after["contacts_mean"],
            # A mixed network (ours): the share of server nodes, clients held in any routing
            # table, and requests that reached a client (a lookup waiting on one): 0 and 0.
            "servers_share": self.plan.options.servers if self.impl == "ours" else 1.0,
            "clients_in_tables": after["clients_in_tables"],
            "requests_to_clients": after["requests_to_clients"],
            "rss_kb": after["rss_kb"],
            "baseline_kb": after["baseline_kb"],
        }

    async def _kill(self) -> None:
        victims = self.plan.victims
        logger.info("%s: killing %d nodes without warning", self.impl, len(victims))
        per_child = {p: {"indices": v} for p, v in self._by_proc(victims).items()}
        if per_child:
            await call_each(self.children, "kill", per_child, timeout=60)


def plan_options(args: argparse.Namespace) -> PlanOptions:
    """Defaults that depend on N, resolved."""
    nodes = args.nodes
    return PlanOptions(
        nodes=nodes,
        procs=min(args.procs, nodes),
        keys=args.keys if args.keys is not None else max(50, nodes // 2),
        lookups=args.lookups,
        service_lookups=(
            args.service_lookups if args.service_lookups is not None else args.lookups // 4
        ),
        services=args.services,
        readers=default_readers(args) if args.readers is None else args.readers,
        kill=args.kill,
        join_parallel=args.join_parallel,
        seed=args.seed,
        servers=args.servers,
    )


def default_readers(args: argparse.Namespace) -> int:
    """Enough readers that no one node's cache or table decides the figures."""
    procs: int = args.procs
    nodes: int = args.nodes
    return max(2 * procs, min(64, nodes // 10))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every implementation asked for; the results as one JSON-ready dict."""
    options = plan_options(args)
    plan = build_plan(options)
    per_proc = plan.nodes_per_proc()
    logger.info(
        "%d nodes over %d processes (%s per process), %d keys, %d readers, %d to kill",
        *(options.nodes, options.procs, "/".join(map(str, per_proc))),
        *(len(plan.keys), len(plan.readers), len(plan.victims)),
    )
    budget = Budget(args.time_limit)
    started = time.monotonic()
    impls = IMPLS if args.impl == "both" else (args.impl,)
    rows: list[dict[str, Any]] = []
    walls: dict[str, float] = {}
    for impl in impls:
        runner = ImplRun(impl, plan, args, budget)
        await runner.run()
        rows.extend(runner.rows)
        walls[impl] = runner.stats["wall_s"]
    return {
        "params": {
            **{k: v for k, v in vars(args).items() if k not in ("child", "proc")},
            "keys": len(plan.keys),
            "readers": len(plan.readers),
            "victims": len(plan.victims),
            "service_lookups": options.service_lookups,
            "services": list(SERVICES[: options.services]),
            "nodes_per_proc": per_proc,
            "memory_method": "per child: RSS after the phase minus the same process's RSS "
            "with zero nodes (after imports), summed, divided by nodes created",
            "latency_method": "every attempt counts, failures included; a timeout counts "
            "the deadline",
        },
        "machine": machine("kademlia", "rpcudp"),
        "rows": rows,
        "ratios": report.ratios(rows),
        "wall_s": time.monotonic() - started,
        "impl_wall_s": walls,
    }


def print_results(results: dict[str, Any]) -> None:
    """The table, the ratio lines and the wall times, on stdout."""
    params = results["params"]
    print(
        f"\nDHT benchmark: N={params['nodes']} over {params['procs']} processes "
        f"({'/'.join(map(str, params['nodes_per_proc']))} nodes per process), "
        f"{params['keys']} keys, {params['lookups']} gets per phase from {params['readers']} "
        f"readers, {params['victims']} nodes killed, seed {params['seed']}"
        + (
            f"; ours: {params['servers']:.0%} servers, the rest clients"
            if params["servers"] < 1
            else ""
        )
    )
    print(report.format_table(results["rows"]))
    if params["servers"] < 1:
        print(report.format_mixed(results["rows"]))
    if results["ratios"]:
        print(report.format_ratios(results["ratios"]))
    walls = ", ".join(f"{k} {v:.1f}s" for k, v in results["impl_wall_s"].items())
    print(f"wall time {results['wall_s']:.1f}s ({walls})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    cpus = os.cpu_count() or 2
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--nodes", type=int, default=200, help="network size N")
    add("--procs", type=int, default=max(2, cpus), help="child processes hosting the nodes")
    add("--lookups", type=int, default=400, help="gets per phase")
    add("--service-lookups", type=int, help="service lookups per phase, ours only (lookups/4)")
    add("--services", type=int, default=4, help=f"services the records offer, 1..{len(SERVICES)}")
    add("--keys", type=int, help="keys stored (max(50, N/2))")
    add("--readers", type=int, help="nodes lookups start from (max(2*procs, min(64, N/10)))")
    add("--kill", type=float, default=0.2, help="share of the nodes killed without warning")
    add(
        "--servers",
        type=float,
        default=1.0,
        help="share of our nodes in server mode, the rest clients (a mixed network)",
    )
    add("--impl", choices=("ours", "raw", "both"), default="both", help="what to measure")
    add("--seed", type=int, default=1, help="seed of every random choice")
    add("--concurrency", type=int, default=8, help="lookups or stores in flight per process")
    add("--join-parallel", type=int, default=2, help="nodes joining at once per process")
    add("--deadline", type=float, default=DEFAULT_DEADLINE, help="seconds per join/store/get")
    add("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, help="seconds for the whole run")
    add("--idle", type=float, default=3.0, help="seconds of idle traffic measured after storing")
    add("--out", type=Path, help="write the figures as JSON here")
    add("--log-level", default="INFO", help="progress logs on stderr")
    add("--child-log-level", default="WARNING", help="the child processes' log level")
    add("--child", action="store_true", help=argparse.SUPPRESS)
    add("--proc", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.child:
        return
    if args.nodes < 3 or args.procs < 1:
        parser.error("--nodes must be >= 3 and --procs >= 1")
    if not 0 <= args.kill < 1:
        parser.error("--kill must be in [0, 1)")
    if not 0 < args.servers <= 1:
        parser.error("--servers must be in (0, 1]")
    if not 1 <= args.services <= len(SERVICES):
        parser.error(f"--services must be 1..{len(SERVICES)}")
    if args.lookups < 1 or args.concurrency < 1 or args.join_parallel < 1:
        parser.error("--lookups, --concurrency and --join-parallel must be >= 1")
    if args.deadline <= 0 or args.time_limit <= 0:
        parser.error("--deadline and --time-limit must be > 0")


def main(argv: Sequence[str] | None = None) -> int:
    """Parent: run the benchmark; child (`--child`): host nodes. Returns the exit code."""
    args = parse_args(argv)
    if args.child:
        from dht_bench_child import child_main

        return child_main(args.impl, args.proc, args.log_level)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        results = asyncio.run(run(args))
    except BenchError as exc:
        logger.error("benchmark failed: %s", exc)
        return 1
    print_results(results)
    if args.out is not None:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
