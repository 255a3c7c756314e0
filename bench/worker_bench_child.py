"""Child mode of worker_bench: one process, one event loop, a share of the worker agents.

The parent writes one JSON command per line on our stdin (`join`, `window_start`,
`window_end`, `restart`, `stop`); each is answered with one JSON line on stdout. Besides the
agents' own counters, it watches the health of the process: how late its event loop wakes up,
its full garbage collections, and the warnings its agents log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common import read_stdin
from worker_bench_plan import STREAM_LIMIT, agent_config
from worker_bench_report import lag_summary

from dht_bridge.dht import shards
from dht_bridge.identity import Identity
from worker.agent import WorkerAgent
from worker.config import WorkerConfig

__all__ = ["ChildAgents", "GCPauses", "WarningCount", "child_main"]

LEAVE_PARALLEL = 32
# With --join-lag, a loop that ran late holds new joins for this long.
JOIN_HOLD = 1.0
# Health of a child during the window: its event loop is probed every LAG_PROBE seconds; a late
# wake-up is time every agent in that process waited for the CPU (a starved loop stretches
# publishes until RPCs time out).
LAG_PROBE = 0.05


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
            "lag_s": lag_summary(self.lags),
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
            "lag_s": lag_summary(self.lags),
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
    reader = await read_stdin(STREAM_LIMIT)
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
