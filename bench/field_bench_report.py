"""The field bench's figures and tables: lookups in ms and in median round trips of the profile,
success, traffic per node by role, and the shared loop's lateness that every figure includes."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any, Protocol

from common import quantile, text_table

from dht_bridge.netem import Profile

__all__ = ["CHURN_FIGURES", "OP_FIGURES", "ROLES", "figures", "render"]

ROLES = ("client", "server", "coordinator")
# What every operation kind's row carries.
OP_FIGURES = (
    "count",
    "p50_ms",
    "p99_ms",
    "p50_rtts",
    "p99_rtts",
    "success_pct",
    "hops_mean",
    "rounds_mean",
    "local_pct",
    "dead_share_mean_pct",
    "dead_share_p99_pct",
    "dead_for_p99_s",
    "dead_for_max_s",
    "age_p99_s",
)
# What a run under churn adds.
CHURN_FIGURES = (
    "crashes",
    "leaves",
    "restarts",
    "restart_failures",
    "restarts_via_coordinators",
    "restart_p50_ms",
    "restart_p99_ms",
    "edge_requests_per_worker_day",
)


class _Op(Protocol):
    seconds: float
    ok: bool
    hops: int
    rounds: int
    local: bool
    dead_share: float
    dead_for: list[float]
    age: float


def _ops(ops: list[_Op], rtt: float) -> dict[str, float]:
    seconds = [op.seconds for op in ops]
    dead_for = [t for op in ops for t in op.dead_for]
    n = max(1, len(ops))
    return {
        "count": len(ops),
        "p50_ms": round(quantile(seconds, 0.5) * 1000, 3),
        "p99_ms": round(quantile(seconds, 0.99) * 1000, 3),
        "p50_rtts": round(quantile(seconds, 0.5) / rtt, 2),
        "p99_rtts": round(quantile(seconds, 0.99) / rtt, 2),
        "success_pct": round(100 * sum(op.ok for op in ops) / n, 2),
        "hops_mean": round(sum(op.hops for op in ops) / n, 2),
        "rounds_mean": round(sum(op.rounds for op in ops) / n, 2),
        "local_pct": round(100 * sum(op.local for op in ops) / n, 1),
        "dead_share_mean_pct": round(100 * sum(op.dead_share for op in ops) / n, 2),
        "dead_share_p99_pct": round(100 * quantile([op.dead_share for op in ops], 0.99), 1),
        # How long a dead provider had been down when an answer named it: within the lease
        # (three heartbeats) is the promise, since a crash leaves no tombstone.
        "dead_for_p99_s": round(quantile(dead_for, 0.99), 1) if dead_for else 0.0,
        "dead_for_max_s": round(max(dead_for), 1) if dead_for else 0.0,
        "age_p99_s": round(quantile([op.age for op in ops], 0.99), 2),
    }


def _traffic(sent: list[float], received: list[float]) -> dict[str, float]:
    both = [s + r for s, r in zip(sent, received, strict=True)]
    return {
        "nodes": len(both),
        "bytes_s_mean": round(statistics.fmean(both), 1) if both else 0.0,
        "bytes_s_p99": round(quantile(both, 0.99), 1),
        "sent_bytes_s_mean": round(statistics.fmean(sent), 1) if sent else 0.0,
    }


def session_line(args: argparse.Namespace) -> str:
    """What churn the run had, in words."""
    if args.no_churn:
        return "no churn"
    return (
        f"{args.session_dist} sessions and offline spells, median {args.session_median:g} s; "
        "half of the departures crashes without tombstone; restarts from the state file"
    )


def _settled(figures: dict[str, Any]) -> str:
    """Each implementation's B/s per node by role while the trie settled, on one line."""
    return (
        "; ".join(
            f"{impl} " + ", ".join(f"{role} {bps}" for role, bps in fig["settle_b_s"].items())
            for impl, fig in figures.items()
            if fig.get("settle_b_s")
        )
        or "-"
    )


def figures(runs: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of every run, by implementation."""
    out: dict[str, Any] = {}
    for run in runs:
        rtt = run.extra["median_rtt_s"]
        counts = {role: sum(w.role == role for w in run.workers) for role in ROLES}
        out[run.impl] = {
            "nodes": len(run.workers),
            **{f"{role}s": counts[role] for role in ROLES},
            "median_rtt_ms": round(rtt * 1000, 1),
            "build_s": round(run.build_s, 2),
            "join_failures": run.join_failures,
            "published_pct": round(100 * run.published / max(1, len(run.workers)), 2),
            "window_s": round(run.window_s, 1),
            "settle_b_s": run.extra.get("settle_b_s", {}),
            "heartbeat_s": args.heartbeat,
            "settle_s": args.settle,
            "traffic": {
                role: _traffic(run.sent.get(role, []), run.received.get(role, []))
                for role in ROLES
                if run.sent.get(role)
            },
            "ops": {kind: _ops(ops, rtt) for kind, ops in run.ops.items()},
            "loop_lag_p50_ms": round(quantile(run.lag, 0.5) * 1000, 1),
            "loop_lag_p99_ms": round(quantile(run.lag, 0.99) * 1000, 1),
            "loss_seen_pct": round(100 * run.loss_seen, 2),
            "churn": churn_figures(run.churn),
            "sessions": session_line(args),
            "clock": clock_name(args),
            **{k: v for k, v in run.extra.items() if k != "median_rtt_s"},
        }
    return out


def clock_name(args: argparse.Namespace) -> str:
    """The run's clock in a word: virtual, real, or dilated<factor> (`--dilate`)."""
    if args.virtual:
        return "virtual"
    return f"dilated{args.dilate:g}" if args.dilate > 1 else "real"


def churn_figures(counts: Any) -> dict[str, Any] | None:
    """A run's churn counts, and its restarts' times (listen to joined) in ms."""
    if counts is None:
        return None
    out = dataclasses.asdict(counts)
    out["edge_requests_per_worker_day"] = round(counts.edge_requests_per_worker_day(), 3)
    seconds = out.pop("restart_seconds")
    out["restart_p50_ms"] = round(quantile(seconds, 0.5) * 1000, 1)
    out["restart_p99_ms"] = round(quantile(seconds, 0.99) * 1000, 1)
    return out


def churn_cells(churn: dict[str, Any] | None) -> list[object]:
    """The churn columns of a run's row ("-" without churn)."""
    if churn is None:
        return ["-"] * 6
    keys = (
        "crashes",
        "leaves",
        "restarts",
        "restarts_via_coordinators",
        "restart_p50_ms",
        "edge_requests_per_worker_day",
    )
    return [churn[k] for k in keys]


def render(figures: dict[str, Any], profile: Profile) -> str:
    """The tables, each under the profile's line."""
    ops = text_table(
        [
            ("impl", "<6"),
            ("operation", "<15"),
            ("n", ">5"),
            ("p50 ms", ">8"),
            ("p99 ms", ">8"),
            ("p50 RTT", ">8"),
            ("p99 RTT", ">8"),
            ("ok %", ">7"),
            ("hops", ">5"),
            ("rounds", ">6"),
            ("local %", ">7"),
            ("dead p99", ">8"),
            ("down s p99", ">10"),
            ("age p99 s", ">9"),
        ],
        [
            [
                impl,
                kind,
                op["count"],
                op["p50_ms"],
                op["p99_ms"],
                op["p50_rtts"],
                op["p99_rtts"],
                op["success_pct"],
                op["hops_mean"],
                op["rounds_mean"],
                op["local_pct"],
                op["dead_share_p99_pct"],
                op["dead_for_p99_s"],
                op["age_p99_s"],
            ]
            for impl, fig in figures.items()
            for kind, op in fig["ops"].items()
        ],
    )
    traffic = text_table(
        [
            ("impl", "<6"),
            ("role", "<12"),
            ("nodes", ">6"),
            ("B/s mean", ">9"),
            ("B/s p99", ">9"),
            ("out B/s", ">8"),
        ],
        [
            [impl, role, t["nodes"], t["bytes_s_mean"], t["bytes_s_p99"], t["sent_bytes_s_mean"]]
            for impl, fig in figures.items()
            for role, t in fig["traffic"].items()
        ],
    )
    runs = text_table(
        [
            ("impl", "<6"),
            ("nodes", ">6"),
            ("clients", ">7"),
            ("build s", ">8"),
            ("join fail", ">9"),
            ("publish %", ">9"),
            ("loss %", ">7"),
            ("lag p50", ">8"),
            ("lag p99", ">8"),
            ("crash", ">5"),
            ("leave", ">5"),
            ("restart", ">7"),
            ("via coord", ">9"),
            ("restart ms", ">10"),
            ("edge/day", ">8"),
            ("wall s", ">7"),
            ("loop s", ">7"),
            ("RSS MB", ">7"),
        ],
        [
            [
                impl,
                fig["nodes"],
                fig["clients"],
                fig["build_s"],
                fig["join_failures"],
                fig["published_pct"],
                fig["loss_seen_pct"],
                fig["loop_lag_p50_ms"],
                fig["loop_lag_p99_ms"],
                *churn_cells(fig["churn"]),
                fig.get("wall_s", "-"),
                fig.get("loop_s", "-"),
                fig.get("peak_rss_mb", "-"),
            ]
            for impl, fig in figures.items()
        ],
    )
    parts = [
        "Lookups (cold service lookups; gets of random workers' records; warm discover(): "
        "DiscoveryCache, local % = answered from the cache; dead p99: the share of an "
        "answer's providers that were down, %; down s p99: how long such a provider had "
        "been down, s; age: of a cached answer)\n" + ops,
    ]
    window = next(iter(figures.values()))
    parts.append(
        f"Traffic per node, in + out, over a {window['window_s']} s window with heartbeats "
        f"every {window['heartbeat_s']} s, opened after {window['settle_s']} s of them "
        f"(meanwhile, B/s per node: {_settled(figures)})\n" + traffic
    )
    for impl, fig in figures.items():
        if fig.get("window_by_rpc"):
            parts.append(_by_rpc(impl, fig["window_by_rpc"]))
    parts.append(
        "Runs (lag: how late the shared event loop ran a timer during the lookups, ms, 0 on "
        "the virtual clock; churn during the window and the lookups; restart ms: p50 from "
        "listening to joined; edge/day: requests to the edge a day per worker, made by "
        "restarts whose saved peers all failed; wall s and loop s: the run's real and loop "
        "seconds; RSS MB: "
        "the process's peak so far)\n" + runs
    )
    rtt = next(iter(figures.values()))["median_rtt_ms"]
    head = f"profile {profile.describe()}\nmedian RTT between this run's hosts: {rtt} ms"
    head += f"\nchurn: {next(iter(figures.values()))['sessions']}"
    head += f"\nclock: {next(iter(figures.values()))['clock']}"
    if uplink := next(iter(figures.values())).get("uplink_b_s"):
        dropped = ", ".join(f"{impl} {fig['uplink_overflow']}" for impl, fig in figures.items())
        head += f"\nuplink: {uplink:g} B/s per host, 0.2 s buffer; datagrams dropped at a full "
        head += f"line: {dropped}"
    return "\n\n".join([head, *parts])


def _by_rpc(impl: str, by_role: dict[str, dict[str, float]]) -> str:
    """Where the window's bytes went, per role: B/s per node by RPC, and contacts asked per
    second by crawl purpose (`asked:<purpose>`), the largest first."""
    lines = [f"Where {impl}'s window traffic goes (per node: B/s by RPC, in + out; asked/s)"]
    for role in ROLES:
        tally = by_role.get(role)
        if not tally:
            continue
        shown = {k: v for k, v in tally.items() if v}
        rpcs = ", ".join(f"{k} {v:g}" for k, v in shown.items() if not k.startswith("asked:"))
        asked = ", ".join(f"{k[6:]} {v:g}" for k, v in shown.items() if k.startswith("asked:"))
        lines.append(f"  {role}: {rpcs}; asked: {asked or '-'}")
    return "\n".join(lines)
