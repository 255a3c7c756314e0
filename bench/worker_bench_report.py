"""Figures of worker_bench: per-worker rates converted back to the real intervals, the table,
the targets and whether they are met, where the DHT bytes go, and the health of the run."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from common import markdown_table, quantile
from worker_bench_plan import REAL_HEARTBEAT, REAL_TTL

from dht_bridge.settings import DHTSettings
from worker.agent import Mode

__all__ = ["TARGETS", "lag_summary", "print_report", "summarise"]

DAY = 86_400.0
TARGET_EDGE_20_PER_DAY = 25
TARGET_BYTES_PER_S = 1024
TARGET_BOOTSTRAP_S = 2.0
TARGETS = {
    "edge_per_day_20_workers": TARGET_EDGE_20_PER_DAY,
    "dht_bytes_per_worker_s": TARGET_BYTES_PER_S,
    "bootstrap_s": TARGET_BOOTSTRAP_S,
}
# The warning of a heartbeat the DHT did not take (worker/agent.py, `_dht_beat`).
FAILED_BEAT = "heartbeat over the DHT failed"


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
        "join_one_ms_p50": round(1000 * quantile(join_one, 0.5), 1),
        "join_one_ms_p99": round(1000 * quantile(join_one, 0.99), 1),
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
        "dht_bytes_per_worker_s_p95": round(quantile(rates, 0.95), 1),
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
        "dht_packets_per_worker_s_p95": round(quantile(packets, 0.95), 2),
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


TABLE_HEADER = (
    *("workers", "procs", "join ms p50 / p99", "join edge req/worker"),
    *("restart edge req/worker", "steady edge req (window)", "edge req/worker/day"),
    "edge req/day, all (+1 fresh join each)",
    *("DHT B/s/worker mean / p95 / max", "heartbeats/worker/min", "on DHT"),
    "baseline edge req/worker/day",
)


def print_report(rows: list[dict[str, Any]], scale: float) -> None:
    """The table, the targets and whether they are met, and agent/baseline ratios."""
    agents = [r for r in rows if r["kind"] == "agent"]
    base = {r["workers"]: r for r in rows if r["kind"] == "edge-only"}
    print(
        f"\nWorker agent in steady state (intervals scaled down {scale:g}x in the run; figures "
        f"converted to the real {REAL_HEARTBEAT:g} s heartbeat / {REAL_TTL:g} s lease)\n"
    )
    rows_out = []
    for r in agents:
        b = base.get(r["workers"])
        rows_out.append(
            [
                *(r["workers"], r["procs"]),
                f"{r['join_one_ms_p50']:g} / {r['join_one_ms_p99']:g}",
                *(f"{r['join_edge_per_worker']:g}", f"{r['restart_edge_per_worker']:g}"),
                f"{r['steady_edge_requests']} ({r['window_real_s']:g} s real)",
                *(f"{r['edge_per_worker_day']:g}", f"{r['edge_per_day_all_workers']:g}"),
                f"{r['dht_bytes_per_worker_s_mean']:g} / {r['dht_bytes_per_worker_s_p95']:g} / "
                f"{r['dht_bytes_per_worker_s_max']:g}",
                f"{r['heartbeats_per_worker_min']:g}",
                f"{r['workers_on_dht']}/{r['workers']}",
                b["edge_per_worker_day"] if b else "-",
            ]
        )
    print(markdown_table(TABLE_HEADER, rows_out))
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


def lag_summary(lags: list[float]) -> dict[str, float]:
    """How late a loop woke up: p50, p99, the worst, and how often by more than an RPC timeout."""
    return {
        "p50": quantile(lags, 0.5),
        "p99": quantile(lags, 0.99),
        "max": max(lags, default=0.0),
        "over_rpc_timeout": sum(1 for x in lags if x > DHTSettings().rpc_timeout),
    }
