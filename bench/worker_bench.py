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

    .venv/bin/python bench/worker_bench.py --workers 20 200 --procs 4 --scale 5 \\
        --out bench/results/worker.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvicorn

from dht_bridge.backoff import ExponentialBackoff
from dht_bridge.dht import shards
from dht_bridge.dht.node import DHTNode
from dht_bridge.identity import Identity
from dht_bridge.registry.registry import open_registry
from dht_bridge.settings import DHTSettings, RegistrySettings
from dht_bridge.tunnels import TunnelPolicy
from edge_router.app import create_app
from edge_router.config import RouterConfig
from worker.agent import Mode, WorkerAgent
from worker.config import DEFAULT_REACH_INTERVAL, WorkerConfig, worker_dht_settings

logger = logging.getLogger("worker_bench")

SCRIPT = Path(__file__).resolve()
REAL_HEARTBEAT = 30.0
REAL_TTL = 90.0
SERVICES = ("ocr", "gpu", "asr", "tts")
DAY = 86_400.0
TARGET_EDGE_20_PER_DAY = 25
TARGET_BYTES_PER_S = 1024
TARGET_BOOTSTRAP_S = 2.0
JOIN_PARALLEL = 4
LEAVE_PARALLEL = 32
# With --join-lag, a loop that ran late holds new joins for this long.
JOIN_HOLD = 1.0
CHILD_TIMEOUT = 600.0
# The joins of a child may take this long per worker on top of CHILD_TIMEOUT (paced joins).
JOIN_TIMEOUT_PER_WORKER = 1.0
STREAM_LIMIT = 1 << 24
# Health of a child during the window: its event loop is probed every LAG_PROBE seconds; a late
# wake-up is time every agent in that process waited for the CPU (a starved loop stretches
# publishes until RPCs time out).
LAG_PROBE = 0.05
# The warning of a heartbeat the DHT did not take (worker/agent.py, `_dht_beat`).
FAILED_BEAT = "heartbeat over the DHT failed"


# -- settings shared by parent and children --------------------------------------------------


def dht_settings(scale: float, *, worker: bool, holder_cache: float | None = None) -> DHTSettings:
    """Loopback DHT settings (the worker's or the core's defaults, `holder_cache` real seconds
    when given) with the periodic intervals scaled down."""
    base = worker_dht_settings() if worker else DHTSettings()
    if holder_cache is not None:
        base = replace(base, holder_cache_ttl=holder_cache)
    return replace(
        base,
        host="127.0.0.1",
        port=0,
        refresh_interval=base.refresh_interval / scale,
        holder_cache_ttl=base.holder_cache_ttl / scale,
    )


def agent_config(
    workdir: Path,
    index: int,
    edge_url: str,
    scale: float,
    *,
    edge_only: bool,
    holder_cache: float | None = None,
    services: int = len(SERVICES),
) -> WorkerConfig:
    """Worker `index`: one of the first `services` services, a trycloudflare URL, every
    interval divided by `scale`."""
    return WorkerConfig(
        services=(SERVICES[index % services],),
        tunnel_url=f"https://bench-{index}.trycloudflare.com",
        state_file=workdir / f"w{index}" / "state.json",
        edge_url=edge_url,
        dht=dht_settings(scale, worker=True, holder_cache=holder_cache),
        heartbeat=REAL_HEARTBEAT / scale,
        ttl=REAL_TTL / scale,
        # Today's coordinator heartbeat: every 30 s through the edge (the baseline).
        fallback_heartbeat=REAL_HEARTBEAT / scale,
        fallback_ttl=REAL_TTL / scale,
        retry=ExponentialBackoff(base=5.0 / scale, cap=300.0 / scale),
        reach_interval=DEFAULT_REACH_INTERVAL / scale,
        edge_only=edge_only,
    )


# -- child: a process running many agents ------------------------------------------------------


class ChildAgents:
    """The agents of one child process, and the counters the parent asks for."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir)
        self.indices = list(range(args.first, args.first + args.count))
        self.agents: list[WorkerAgent] = []
        self.mark: dict[str, Any] = {}
        self.warnings = WarningCount()
        logging.getLogger().addHandler(self.warnings)
        self.gc = GCPauses()
        self.lags: list[float] = []
        self.lag_task: asyncio.Task[None] | None = None
        # Joins wait until this loop time (see `--join-lag`).
        self.hold_joins_until = 0.0

    async def probe_lag(self) -> None:
        """Record how late the loop wakes up, every LAG_PROBE seconds, from the joins on."""
        loop = asyncio.get_running_loop()
        limit = self.args.join_lag / 1000
        while True:
            due = loop.time() + LAG_PROBE
            await asyncio.sleep(LAG_PROBE)
            now = loop.time()
            self.lags.append(now - due)
            if limit and now - due > limit:
                self.hold_joins_until = now + JOIN_HOLD

    async def joins_may_go(self) -> float:
        """With `--join-lag`, wait while this loop runs late; the seconds waited."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while True:
            wait = self.hold_joins_until - loop.time()
            if wait <= 0:
                return loop.time() - began
            await asyncio.sleep(wait)  # a lag seen meanwhile pushes the hold further

    def config(self, index: int) -> WorkerConfig:
        """Worker `index`'s configuration."""
        return agent_config(
            self.workdir,
            index,
            self.args.edge,
            self.args.scale,
            edge_only=self.args.edge_only,
            holder_cache=self.args.holder_cache,
            services=self.args.services,
        )

    async def join(self) -> dict[str, Any]:
        """Start every agent (a few at a time); their edge requests and modes."""
        gate = asyncio.Semaphore(self.args.join_parallel)
        took: list[float] = []
        held: list[float] = []

        async def one(index: int) -> WorkerAgent:
            async with gate:
                held.append(await self.joins_may_go())
                config = self.config(index)
                Identity.generate().save(config.state_file.with_suffix(".key"))
                agent = WorkerAgent(config)
                # A worker's bootstrap, end to end: the HTTP request for peers, the DHT
                # join and the first publish of its record.
                began = time.monotonic()
                await agent.start()
                took.append(time.monotonic() - began)
                return agent

        started = time.monotonic()
        self.warnings.counts.clear()
        self.lags.clear()
        self.lag_task = asyncio.get_running_loop().create_task(self.probe_lag())
        self.agents = list(await asyncio.gather(*(one(i) for i in self.indices)))
        if not self.args.no_gc_freeze:
            # Hundreds of agents share this heap, where production runs one per process: what
            # the joins built is left out of later full collections, each of which otherwise
            # stops every agent here for up to a second (GCPauses times them).
            gc.collect()
            gc.freeze()
        return {
            "join_one_s": took,
            "join_s": time.monotonic() - started,
            "join_held_s": sum(held),
            "lag_s": _lag_summary(self.lags),
            "join_edge": [sum(a.edge_requests.values()) for a in self.agents],
            "modes": [a.mode.value for a in self.agents],
            "warnings": dict(self.warnings.counts),
        }

    def snapshot(self) -> dict[str, Any]:
        """The counters now, per agent."""
        return {
            "at": time.monotonic(),
            "edge": [sum(a.edge_requests.values()) for a in self.agents],
            "bytes": [_bytes(a) for a in self.agents],
            "beats": [a.heartbeats for a in self.agents],
            "packets": [_stat(a, "packets_in") + _stat(a, "packets_out") for a in self.agents],
            "timeouts": [_stat(a, "timeouts") for a in self.agents],
            "reprieves": [_stat(a, "reprieves") for a in self.agents],
            "rpc": [_rpc_bytes(a) for a in self.agents],
            "crawls": [dict(a.node.crawl_queries) if a.node else {} for a in self.agents],
            "cpu": time.process_time(),
        }

    def window_start(self) -> dict[str, Any]:
        """Mark the start of the measured window."""
        self.mark = self.snapshot()
        self.gc.clear()
        self.warnings.counts.clear()
        self.lags.clear()
        return {}

    async def window_end(self) -> dict[str, Any]:
        """What each agent did since `window_start`, and how the process fared."""
        end = self.snapshot()

        def delta(name: str) -> list[int]:
            return [b - a for a, b in zip(self.mark[name], end[name], strict=True)]

        def tally_delta(name: str) -> list[dict[str, int]]:
            return [
                {key: n - a.get(key, 0) for key, n in b.items()}
                for a, b in zip(self.mark[name], end[name], strict=True)
            ]

        return {
            "seconds": end["at"] - self.mark["at"],
            "edge": delta("edge"),
            "bytes": delta("bytes"),
            "beats": delta("beats"),
            "packets": delta("packets"),
            "timeouts": delta("timeouts"),
            "reprieves": delta("reprieves"),
            "rpc": tally_delta("rpc"),
            "crawls": tally_delta("crawls"),
            "shards_held": [_shards_held(a) for a in self.agents],
            "modes": [a.mode.value for a in self.agents],
            "cpu_s": end["cpu"] - self.mark["cpu"],
            "lag_s": _lag_summary(self.lags),
            "gc": self.gc.summary(),
            "warnings": dict(self.warnings.counts),
        }

    async def restart(self) -> dict[str, Any]:
        """Stop the first agent (a tombstone) and start it again from its state file."""
        first = self.agents[0]
        await first.aclose()
        again = WorkerAgent(self.config(self.indices[0]))
        await again.start()
        self.agents[0] = again
        return {"restart_edge": sum(again.edge_requests.values()), "mode": again.mode.value}

    async def stop(self) -> dict[str, Any]:
        """Every agent leaves."""
        if self.lag_task is not None:
            self.lag_task.cancel()
            await asyncio.gather(self.lag_task, return_exceptions=True)
            self.lag_task = None
        # Machines do not all leave in the same second: a bounded number at a time per loop.
        # (At 2000 agents many leaves still outlast their 3 s timeout: every process's peers
        # are leaving too.)
        gate = asyncio.Semaphore(LEAVE_PARALLEL)

        async def leave(agent: WorkerAgent) -> None:
            async with gate:
                await agent.aclose()

        await asyncio.gather(*(leave(agent) for agent in self.agents))
        return {}


def _bytes(agent: WorkerAgent) -> int:
    return _stat(agent, "bytes_in") + _stat(agent, "bytes_out")


def _stat(agent: WorkerAgent, name: str) -> int:
    """One counter of the agent's DHT node (`TrafficStats`); 0 without a node."""
    if agent.node is None or agent.node.protocol is None:
        return 0
    return int(getattr(agent.node.rpc.stats, name))


def _rpc_bytes(agent: WorkerAgent) -> dict[str, int]:
    """The agent's DHT bytes by RPC (requests and replies, both ways)."""
    if agent.node is None or agent.node.protocol is None:
        return {}
    return dict(agent.node.rpc.stats.rpc_bytes)


def _shards_held(agent: WorkerAgent) -> list[int]:
    """The trie levels of the service shards the agent's node holds records of."""
    if agent.node is None:
        return []
    storage = agent.node.storage
    levels = []
    for digest in storage.digests():
        parsed = shards.parse_service_key(storage.key_name(digest) or "")
        if parsed is not None and storage.records(digest):
            levels.append(shards.level_of(parsed[1]))
    return sorted(levels)


def _lag_summary(lags: list[float]) -> dict[str, float]:
    ordered = sorted(lags)
    return {
        "p50": _quantile(ordered, 0.5),
        "p99": _quantile(ordered, 0.99),
        "max": _quantile(ordered, 1.0),
        "over_rpc_timeout": sum(1 for x in ordered if x > DHTSettings().rpc_timeout),
    }


class GCPauses:
    """Times the interpreter's full (generation 2) collections: with hundreds of agents in one
    process the heap is large and a full collection stops every agent of it at once."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._began = 0.0
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._began)

    def summary(self) -> dict[str, float]:
        """Full collections since the last `clear`, and the longest pause."""
        return {"count": len(self.pauses), "max_s": round(max(self.pauses, default=0.0), 3)}

    def clear(self) -> None:
        """Start counting afresh."""
        self.pauses.clear()


class WarningCount(logging.Handler):
    """Counts WARNING and worse records by logger and message template (e.g. "heartbeat over
    the DHT failed: %s"): failed heartbeats, falls back to the edge, slow leaves."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{record.name}: {record.msg}"
        self.counts[key] = self.counts.get(key, 0) + 1


async def child_main(args: argparse.Namespace) -> int:
    """Answer the parent's commands, one JSON line each way."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    child = ChildAgents(args)
    ops = {
        "join": child.join,
        "window_start": child.window_start,
        "window_end": child.window_end,
        "restart": child.restart,
        "stop": child.stop,
    }
    try:
        while line := await reader.readline():
            op = json.loads(line)["op"]
            result = ops[op]()
            if asyncio.iscoroutine(result):
                result = await result
            sys.stdout.write(json.dumps({"op": op, "result": result}) + "\n")
            sys.stdout.flush()
            if op == "stop":
                return 0
    finally:
        with contextlib.suppress(Exception):
            await child.stop()
    return 0


# -- parent ------------------------------------------------------------------------------------


class Child:
    """One child process and its command channel."""

    def __init__(self, process: asyncio.subprocess.Process, count: int) -> None:
        self.process = process
        self.count = count

    @classmethod
    async def spawn(cls, args: list[str], log_level: str, count: int) -> Child:
        """Start this script with `--child`."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--child",
            "--log-level",
            log_level,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=STREAM_LIMIT,
        )
        return cls(process, count)

    async def call(self, op: str) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op}).encode() + b"\n")
        await self.process.stdin.drain()
        limit = CHILD_TIMEOUT + (JOIN_TIMEOUT_PER_WORKER * self.count if op == "join" else 0)
        async with asyncio.timeout(limit):
            line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited during {op} (code {await self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)["result"]
        return answer

    async def close(self) -> None:
        """Wait for the child to exit (it does after `stop`), killing it if it hangs."""
        if self.process.returncode is None:
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers (the benchmark is stopped with the rest)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def edge_router(coordinators: list[DHTNode]) -> AsyncIterator[tuple[str, Any]]:
    """The router app on an OS port over the embedded registry; its URL and state."""
    config = RouterConfig(coordinators=tuple(node.address for node in coordinators))
    registry = open_registry(RegistrySettings(), policy=TunnelPolicy())
    app = create_app(config, registry=registry, listen_events=False)
    server = QuietServer(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    async with app.router.lifespan_context(app):
        task = asyncio.get_running_loop().create_task(server.serve())
        try:
            while not server.started:
                if task.done():
                    await task
                    raise RuntimeError("the router stopped before it started")
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            yield f"http://127.0.0.1:{port}", app.state.rma
        finally:
            server.should_exit = True
            await task
            await registry.aclose()


@contextlib.asynccontextmanager
async def coordinator_nodes(args: argparse.Namespace) -> AsyncIterator[list[DHTNode]]:
    """`--coordinators` DHT nodes joined to the first, closed on exit."""
    settings = dht_settings(args.scale, worker=False)
    nodes: list[DHTNode] = []
    try:
        for i in range(args.coordinators):
            node = DHTNode(settings, policy=TunnelPolicy())
            nodes.append(node)
            await node.listen()
            if i:
                await node.bootstrap([nodes[0].address])
        yield nodes
    finally:
        await asyncio.gather(*(node.aclose() for node in nodes))


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
    procs = max(1, min(args.procs, n))
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    kind = "edge-only baseline" if edge_only else "agent"
    with tempfile.TemporaryDirectory(prefix="worker-bench-") as workdir:
        children: list[Child] = []
        first = 0
        for share in shares:
            child_args = [
                *("--edge", edge_url, "--scale", str(scale), "--workdir", workdir),
                *("--first", str(first), "--count", str(share)),
                *(["--edge-only"] if edge_only else []),
                *(["--holder-cache", str(args.holder_cache)] if args.holder_cache else []),
                *("--services", str(args.services)),
                *(["--no-gc-freeze"] if args.no_gc_freeze else []),
                *("--join-parallel", str(args.join_parallel), "--join-lag", str(args.join_lag)),
            ]
            children.append(await Child.spawn(child_args, args.log_level, share))
            first += share
        try:
            joined = await asyncio.gather(*(c.call("join") for c in children))
            logger.info("%d workers (%s) joined; steady window %.1fs", n, kind, window)
            # Let the joins' own traffic (crawls, first stores) settle for one heartbeat.
            await asyncio.sleep(REAL_HEARTBEAT / scale)
            coord_before = sum(_node_bytes(node) for node in coordinators)
            router_before = _router_requests(router)
            await asyncio.gather(*(c.call("window_start") for c in children))
            started = time.monotonic()
            parent_cpu = time.process_time()
            await asyncio.sleep(window)
            ends = await asyncio.gather(*(c.call("window_end") for c in children))
            elapsed = time.monotonic() - started
            parent_cpu = time.process_time() - parent_cpu
            coord_bytes = sum(_node_bytes(node) for node in coordinators) - coord_before
            router_seen = _router_requests(router) - router_before
            restarts = []
            if not edge_only:
                restarts = await asyncio.gather(*(c.call("restart") for c in children))
            await asyncio.gather(*(c.call("stop") for c in children))
        finally:
            for child in children:
                await child.close()
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


def summarise(
    n: int,
    procs: int,
    scale: float,
    joined: list[dict[str, Any]],
    ends: list[dict[str, Any]],
    restarts: list[dict[str, Any]],
    elapsed: float,
    coord_bytes: int,
    router_seen: int,
    edge_only: bool,
    coordinators: int,
    parent_cpu_share: float,
) -> dict[str, Any]:
    """Per-worker figures, converted from the scaled run to real intervals."""
    edge = [x for end in ends for x in end["edge"]]
    seconds = statistics.mean(end["seconds"] for end in ends)
    rates = sorted(b / end["seconds"] / scale for end in ends for b in end["bytes"])
    beats = [x for end in ends for x in end["beats"]]
    all_bytes = [x for end in ends for x in end["bytes"]]
    modes = [m for end in ends for m in end["modes"]]
    per_day = sum(edge) / n / seconds * DAY / scale
    join_edge = [x for j in joined for x in j["join_edge"]]
    join_one = sorted(x for j in joined for x in j["join_one_s"])
    fresh = 0.0 if edge_only else statistics.mean(join_edge)
    packets = sorted(p / end["seconds"] / scale for end in ends for p in end["packets"])
    timeouts = sum(x for end in ends for x in end["timeouts"])
    warnings = _merge(end["warnings"] for end in ends)
    failed = sum(n for text, n in warnings.items() if FAILED_BEAT in text)
    rpc = [x for end in ends for x in end["rpc"]]
    held = [x for end in ends for x in end["shards_held"]]
    busiest = _top(all_bytes, 0.05)
    return {
        "kind": "edge-only" if edge_only else "agent",
        "workers": n,
        "procs": procs,
        "scale": scale,
        "window_real_s": round(seconds * scale, 1),
        "join_s": round(max(j["join_s"] for j in joined), 2),
        "join_edge_per_worker": round(statistics.mean(join_edge), 3),
        "join_one_ms_p50": _quantile_ms(join_one, 0.5),
        "join_one_ms_p99": _quantile_ms(join_one, 0.99),
        "restart_edge_per_worker": (
            round(statistics.mean(r["restart_edge"] for r in restarts), 3) if restarts else None
        ),
        "steady_edge_requests": sum(edge),
        "router_seen_requests": router_seen,
        "edge_per_worker_day": round(per_day, 2),
        # Pessimistic: each worker also starts fresh (no state file) once a day.
        "edge_per_day_all_workers": round(n * (per_day + fresh), 1),
        "edge_per_day_20_workers": round(20 * (per_day + fresh), 1),
        "dht_bytes_per_worker_s_mean": round(statistics.mean(rates), 1),
        "dht_bytes_per_worker_s_p95": round(_quantile(rates, 0.95), 1),
        "dht_bytes_per_worker_s_max": round(rates[-1], 1),
        # A loaded machine stretches the scaled intervals (a publish takes as long as ever):
        # per heartbeat, then at exactly one heartbeat per real interval.
        "dht_bytes_per_heartbeat": round(sum(all_bytes) / max(sum(beats), 1), 1),
        "dht_bytes_per_worker_s_nominal": round(
            sum(all_bytes) / max(sum(beats), 1) / REAL_HEARTBEAT, 1
        ),
        "coordinator_bytes_s_each": round(coord_bytes / elapsed / scale / coordinators, 1),
        "heartbeats_per_worker_min": round(statistics.mean(beats) / seconds * 60 / scale, 2),
        "workers_on_dht": sum(1 for m in modes if m == Mode.DHT.value),
        # Health of the run: every figure above assumes the loops kept up with the pace.
        "dht_packets_per_worker_s_mean": round(statistics.mean(packets), 2),
        "dht_packets_per_worker_s_p95": round(_quantile(packets, 0.95), 2),
        "dht_packets_per_worker_s_max": round(packets[-1], 2),
        "dht_packets_per_heartbeat": round(
            sum(x for end in ends for x in end["packets"]) / max(sum(beats), 1), 1
        ),
        "rpc_timeouts": timeouts,
        "rpc_timeouts_per_heartbeat": round(timeouts / max(sum(beats), 1), 3),
        # Timeouts that fired while the agent's own loop ran late and were given another.
        "rpc_reprieves": sum(x for end in ends for x in end["reprieves"]),
        "failed_heartbeats": failed,
        "loop_lag_ms_p50": round(1000 * max(end["lag_s"]["p50"] for end in ends), 1),
        "loop_lag_ms_p99": round(1000 * max(end["lag_s"]["p99"] for end in ends), 1),
        "loop_lag_ms_max": round(1000 * max(end["lag_s"]["max"] for end in ends), 1),
        "loop_lags_over_rpc_timeout": sum(end["lag_s"]["over_rpc_timeout"] for end in ends),
        "gc_full_collections": sum(end["gc"]["count"] for end in ends),
        "gc_full_pause_s_max": max(end["gc"]["max_s"] for end in ends),
        "join_loop_lag_ms_p99": round(1000 * max(j["lag_s"]["p99"] for j in joined), 1),
        "join_loop_lag_ms_max": round(1000 * max(j["lag_s"]["max"] for j in joined), 1),
        "join_held_s": round(max(j["join_held_s"] for j in joined), 1),
        "cpu_share_children": [round(end["cpu_s"] / end["seconds"], 3) for end in ends],
        "cpu_share_parent": round(parent_cpu_share, 3),
        "rpc_bytes_per_heartbeat": _per_beat(rpc, beats),
        # Where the busiest twentieth of the workers (by bytes) spend theirs.
        "rpc_bytes_per_heartbeat_top5pct": _per_beat(
            [rpc[i] for i in busiest], [beats[i] for i in busiest]
        ),
        # Who the busiest are: the service shards (by trie level) they hold at the window's end.
        "shard_levels_held": _held_summary(held),
        "shard_levels_held_top5pct": _held_summary([held[i] for i in busiest]),
        "shard_levels_held_busiest": held[busiest[0]] if held else [],
        "crawl_queries_per_heartbeat": _per_beat(
            [x for end in ends for x in end["crawls"]], beats, digits=2
        ),
        "warnings_join": _merge(j["warnings"] for j in joined),
        "warnings_window": warnings,
    }


def _per_beat(tallies: list[dict[str, int]], beats: list[int], digits: int = 1) -> dict[str, float]:
    """Tallies (bytes by RPC, queries by crawl purpose) per heartbeat, largest first."""
    total = _merge(tallies)
    per = {name: round(n / max(sum(beats), 1), digits) for name, n in total.items()}
    return dict(sorted(per.items(), key=lambda item: -item[1]))


def _top(all_bytes: list[int], share: float) -> list[int]:
    """Indices of the `share` of workers that moved the most bytes, busiest first."""
    order = sorted(range(len(all_bytes)), key=lambda i: -all_bytes[i])
    return order[: max(1, round(len(order) * share))]


def _held_summary(held: list[list[int]]) -> dict[str, float]:
    """Shards held per worker, on average: in all, and at each trie level."""
    workers = max(len(held), 1)
    levels = _merge({f"level {level}": 1} for one in held for level in one)
    return {
        "all": round(sum(len(one) for one in held) / workers, 2),
        **{name: round(n / workers, 2) for name, n in sorted(levels.items())},
    }


def _merge(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, n in one.items():
            total[key] = total.get(key, 0) + n
    return total


def _quantile(ordered: list[float], q: float) -> float:
    """The value at quantile `q` of a sorted list (nearest rank below), 0.0 when empty."""
    return ordered[int(q * (len(ordered) - 1))] if ordered else 0.0


def _quantile_ms(ordered: list[float], q: float) -> float:
    return round(1000 * _quantile(ordered, q), 1)


def print_report(rows: list[dict[str, Any]], scale: float) -> None:
    """The table, the targets and whether they are met, and agent/baseline ratios."""
    agents = [r for r in rows if r["kind"] == "agent"]
    base = {r["workers"]: r for r in rows if r["kind"] == "edge-only"}
    print(
        f"\nWorker agent in steady state (intervals scaled down {scale:g}x in the run; figures "
        f"converted to the real {REAL_HEARTBEAT:g} s heartbeat / {REAL_TTL:g} s lease)\n"
    )
    head = (
        "| workers | procs | join ms p50 / p99 | join edge req/worker | restart edge req/worker "
        "| steady edge req "
        "(window) | edge req/worker/day | edge req/day, all (+1 fresh join each) | DHT B/s/worker "
        "mean / p95 / max | heartbeats/worker/min | on DHT | baseline edge req/worker/day |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in agents:
        b = base.get(r["workers"])
        print(
            f"| {r['workers']} | {r['procs']} | {r['join_one_ms_p50']:g} / "
            f"{r['join_one_ms_p99']:g} | {r['join_edge_per_worker']:g} | "
            f"{r['restart_edge_per_worker']:g} | {r['steady_edge_requests']} "
            f"({r['window_real_s']:g} s real) | {r['edge_per_worker_day']:g} | "
            f"{r['edge_per_day_all_workers']:g} | {r['dht_bytes_per_worker_s_mean']:g} / "
            f"{r['dht_bytes_per_worker_s_p95']:g} / {r['dht_bytes_per_worker_s_max']:g} | "
            f"{r['heartbeats_per_worker_min']:g} | {r['workers_on_dht']}/{r['workers']} | "
            f"{b['edge_per_worker_day'] if b else '-'} |"
        )
    print("\nTargets (from the seed):")
    for r in agents:
        value = r["edge_per_day_20_workers"]
        verdict = "met" if value < TARGET_EDGE_20_PER_DAY else "NOT met"
        print(
            f"- < {TARGET_EDGE_20_PER_DAY} edge requests a day for 20 workers, from the "
            f"{r['workers']}-worker run: {value:g} (steady {r['edge_per_worker_day']:g} per "
            f"worker a day, plus one fresh join each at {r['join_edge_per_worker']:g} request; "
            f"a restart from the state file costs {r['restart_edge_per_worker']:g}): {verdict}"
        )
    for r in agents:
        mean, worst = r["dht_bytes_per_worker_s_mean"], r["dht_bytes_per_worker_s_max"]
        if worst < TARGET_BYTES_PER_S:
            verdict = "met by every worker"
        elif mean < TARGET_BYTES_PER_S:
            verdict = "met on average, NOT by every worker (the busiest shard holders exceed it)"
        else:
            verdict = "NOT met"
        print(
            f"- < 1 KB/s per worker, {r['workers']} workers: mean {mean:g} B/s, "
            f"p95 {r['dht_bytes_per_worker_s_p95']:g} B/s, max {worst:g} B/s: {verdict} "
            f"({r['dht_bytes_per_heartbeat']:g} B per heartbeat, in and out: "
            f"{r['dht_bytes_per_worker_s_nominal']:g} B/s at exactly one per "
            f"{REAL_HEARTBEAT:g} s)"
        )
    for r in agents:
        worst = r["join_one_ms_p99"] / 1000
        verdict = "met" if worst < TARGET_BOOTSTRAP_S else "NOT met"
        print(
            f"- bootstrap < {TARGET_BOOTSTRAP_S:g} s, {r['workers']} workers joining "
            f"{r['join_parallel']} at a time per process (HTTP bootstrap, DHT join, first "
            "publish): "
            f"p50 {r['join_one_ms_p50']:g} ms, p99 {r['join_one_ms_p99']:g} ms: {verdict}"
        )
    print("\nWhere the DHT bytes go, per heartbeat (requests and replies, in and out):")
    for r in agents:
        print(
            f"- {r['workers']} workers, all: {_rpc_line(r['rpc_bytes_per_heartbeat'])}; "
            f"busiest 5%: {_rpc_line(r['rpc_bytes_per_heartbeat_top5pct'])}; contacts asked by "
            f"crawls: {_rpc_line(r['crawl_queries_per_heartbeat'], '')}; service shards held "
            f"per worker, all: {_rpc_line(r['shard_levels_held'], '')}; busiest 5%: "
            f"{_rpc_line(r['shard_levels_held_top5pct'], '')}; the busiest worker holds levels "
            f"{r['shard_levels_held_busiest']}"
        )
    print("\nHealth of the window (a starved loop stretches publishes until RPCs time out):")
    for r in rows:
        print(
            f"- {r['workers']} workers, {r['kind']}: {r['failed_heartbeats']} failed DHT "
            f"heartbeats, {r['rpc_timeouts']} RPC timeouts ({r['rpc_timeouts_per_heartbeat']:g} "
            f"per heartbeat; {r['rpc_reprieves']} more fired late and waited again), "
            "DHT packets/s/worker mean / p95 / max "
            f"{r['dht_packets_per_worker_s_mean']:g} / {r['dht_packets_per_worker_s_p95']:g} / "
            f"{r['dht_packets_per_worker_s_max']:g} ({r['dht_packets_per_heartbeat']:g} per "
            f"heartbeat), loop lag ms p50 / p99 / max (worst process) "
            f"{r['loop_lag_ms_p50']:g} / {r['loop_lag_ms_p99']:g} / {r['loop_lag_ms_max']:g} "
            f"({r['gc_full_collections']} full garbage collections, the longest "
            f"{r['gc_full_pause_s_max']:g} s), "
            f"CPU share of a core: children {r['cpu_share_children']}, parent "
            f"{r['cpu_share_parent']:g}; {_verdict(r)}. During the joins: "
            f"{sum(r['warnings_join'].values())} warnings, loop lag ms p99 / max "
            f"{r['join_loop_lag_ms_p99']:g} / {r['join_loop_lag_ms_max']:g}"
        )
    print("\nBaseline measured alongside: the same workers with --edge-only, heartbeating")
    print("through the edge every 30 s as today's coordinator protocol does.")
    for r in agents:
        b = base.get(r["workers"])
        if b:
            ratio = r["edge_per_day_all_workers"] / max(b["edge_per_day_all_workers"], 1e-9)
            print(
                f"- {r['workers']} workers: {r['edge_per_day_all_workers']:g} vs "
                f"{b['edge_per_day_all_workers']:g} edge requests a day, agent/baseline "
                f"{ratio:.5f}"
            )


def _rpc_line(per_beat: dict[str, float], unit: str = " B") -> str:
    return ", ".join(f"{name} {n:g}{unit}" for name, n in per_beat.items()) or "none"


def _verdict(row: dict[str, Any]) -> str:
    """Healthy: every heartbeat taken, every worker on the DHT (agents), the pace kept (at
    least 90% of the nominal beats) and no loop late by more than the 0.5 s RPC timeout."""
    problems = []
    if row["failed_heartbeats"]:
        problems.append("heartbeats failed")
    # (The baseline's heartbeats go to the edge and are not counted as DHT heartbeats.)
    if row["kind"] == "agent" and row["workers_on_dht"] < row["workers"]:
        problems.append("workers off the DHT")
    if row["kind"] == "agent" and row["heartbeats_per_worker_min"] < 0.9 * 60 / REAL_HEARTBEAT:
        problems.append("heartbeats behind the pace")
    if row["loop_lag_ms_max"] > 1000 * DHTSettings().rpc_timeout:
        problems.append("loops late by more than the RPC timeout")
    return "healthy" if not problems else "DISTORTED: " + ", ".join(problems)


async def parent_main(args: argparse.Namespace) -> int:
    """Coordinators and the router here; workers in children; table and JSON at the end."""
    rows: list[dict[str, Any]] = []
    for n in args.workers:
        for edge_only in (False, True):
            if edge_only and args.no_baseline:
                continue
            # Fresh coordinators and router for every run: the last run's workers are gone,
            # and dead contacts would tax the next run's joins.
            async with (
                coordinator_nodes(args) as coordinators,
                edge_router(coordinators) as (
                    url,
                    router,
                ),
            ):
                rows.append(await measure(n, args, url, router, coordinators, edge_only=edge_only))
    print_report(rows, args.scale)
    if args.out:
        out = Path(args.out)
        write_json(
            out,
            {
                "params": {k: v for k, v in vars(args).items() if k not in ("child", "log_level")},
                "targets": {
                    "edge_per_day_20_workers": TARGET_EDGE_20_PER_DAY,
                    "dht_bytes_per_worker_s": TARGET_BYTES_PER_S,
                    "bootstrap_s": TARGET_BOOTSTRAP_S,
                },
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "rows": rows,
            },
        )
        print(f"\nwrote {out}")
    return 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    """The figures as JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


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
