"""Figures of dht_bench: quantiles (NaN when there is nothing to rank), one row per
implementation and phase, the table, ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from common import quantile, text_table

# Figures compared as ours/raw (below 1 is better for ours, except success) and their labels.
RATIO_LABELS = {
    "build_s": "build s",
    "join_p50_ms": "join p50 ms",
    "join_p99_ms": "join p99 ms",
    "lookup_p50_ms": "lookup p50 ms",
    "lookup_p95_ms": "lookup p95 ms",
    "lookup_p99_ms": "lookup p99 ms",
    "lookup_max_ms": "lookup max ms",
    "success_pct": "success %",
    "mem_per_node_kb": "mem/node KB",
    "pkts_per_lookup": "pkts/lookup",
    "idle_bytes_per_node_s": "idle B/s/node",
}
RATIO_FIGURES = tuple(RATIO_LABELS)

NAN = math.nan
Result = Sequence[Any]  # [ok, seconds, hops, status, local] from a child


def latency_figures(results: Sequence[Result]) -> dict[str, Any]:
    """Latency over every attempt (a failure counts the time it took to fail, a timeout the
    deadline), success share, and hops over the lookups that report them."""
    ms = [r[1] * 1000 for r in results]
    hops = [r[2] for r in results if r[2] is not None]
    ok = sum(1 for r in results if r[0])
    return {
        "lookups": len(results),
        "lookup_p50_ms": quantile(ms, 0.5, empty=NAN),
        "lookup_p95_ms": quantile(ms, 0.95, empty=NAN),
        "lookup_p99_ms": quantile(ms, 0.99, empty=NAN),
        "lookup_max_ms": max(ms, default=math.nan),
        "success_pct": 100.0 * ok / len(results) if results else math.nan,
        "timeouts": sum(1 for r in results if r[3] == "timeout"),
        "errors": sum(1 for r in results if r[3] == "error"),
        # Answered from the reader's own storage: the stock get then asks no one.
        "local_pct": 100.0 * sum(1 for r in results if r[4]) / len(results) if results else 0.0,
        "hops_mean": sum(hops) / len(hops) if hops else None,
        "hops_max": max(hops) if hops else None,
    }


def join_figures(results: Sequence[Result], build_s: float) -> dict[str, Any]:
    """Network build time and per-node join time."""
    ms = [r[1] * 1000 for r in results]
    return {
        "build_s": build_s,
        "join_p50_ms": quantile(ms, 0.5, empty=NAN),
        "join_p99_ms": quantile(ms, 0.99, empty=NAN),
        "join_max_ms": max(ms, default=math.nan),
        "join_failures": sum(1 for r in results if not r[0]),
    }


def store_figures(results: Sequence[Result]) -> dict[str, Any]:
    """How storing the keys went."""
    ms = [r[1] * 1000 for r in results]
    return {
        "keys": len(results),
        "stored": sum(1 for r in results if r[0]),
        "store_p50_ms": quantile(ms, 0.5, empty=NAN),
        "store_p99_ms": quantile(ms, 0.99, empty=NAN),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        # Sub-millisecond latencies (a stock get answered locally) would all print as 0.0.
        return f"{value:.{digits + 1 if 0 < abs(value) < 1 else digits}f}"
    return str(value)


TABLE_COLUMNS = (
    *(("impl", "<5"), ("phase", "<7"), ("lookup", "<8"), ("N", ">5"), ("procs", ">5")),
    *(("build s", ">8"), ("join p50/p99 ms", ">16"), ("lookup p50/p95/p99/max ms", ">30")),
    *(("success %", ">9"), ("hops", ">5"), ("mem/node KB", ">11")),
    *(("stored KB mean/max", ">18"), ("pkts/lookup", ">11"), ("idle B/s/node", ">13")),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per implementation, phase and kind of lookup."""
    return text_table(TABLE_COLUMNS, (_table_row(row) for row in rows))


def _table_row(row: dict[str, Any]) -> list[Any]:
    return [
        *(row["impl"], row["phase"], row["kind"], row["nodes"], row["procs"]),
        _fmt(row["build_s"], 2),
        f"{_fmt(row['join_p50_ms'])}/{_fmt(row['join_p99_ms'])}",
        "/".join(_fmt(row[f"lookup_{p}_ms"]) for p in ("p50", "p95", "p99", "max")),
        *(_fmt(row["success_pct"], 2), _fmt(row["hops_mean"], 2), _fmt(row["mem_per_node_kb"], 0)),
        f"{_fmt(row['stored_kb_mean'])}/{_fmt(row['stored_kb_max'])}",
        *(_fmt(row["pkts_per_lookup"], 1), _fmt(row["idle_bytes_per_node_s"], 0)),
    ]


def format_mixed(rows: Sequence[dict[str, Any]]) -> str:
    """For a mixed network: what must stay zero, per row of ours."""
    lines = []
    for row in rows:
        if row["impl"] == "ours":
            lines.append(
                f"ours {row['phase']} {row['kind']}: {row['servers_share']:.0%} servers; "
                f"clients in routing tables {row['clients_in_tables']}, requests that "
                f"reached a client {row['requests_to_clients']}"
            )
    return "\n".join(lines)


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """ours/raw for each figure of the `get` rows, per phase (None where raw is 0 or absent)."""
    by_key = {(r["impl"], r["phase"]): r for r in rows if r["kind"] == "get"}
    out: dict[str, dict[str, float | None]] = {}
    for phase in ("before", "after"):
        ours, raw = by_key.get(("ours", phase)), by_key.get(("raw", phase))
        if ours is None or raw is None:
            continue
        out[phase] = {name: _ratio(ours[name], raw[name]) for name in RATIO_FIGURES}
    return out


def _ratio(ours: Any, raw: Any) -> float | None:
    if ours is None or raw is None or not raw or math.isnan(ours) or math.isnan(raw):
        return None
    return float(ours) / float(raw)


def format_ratios(table: dict[str, dict[str, float | None]]) -> str:
    """One line per figure: ours/raw before and after churn (< 1 is better for ours, except
    success)."""
    phases = list(table)
    titles = {"before": "before churn", "after": "after churn"}
    lines = [f"{'ours/raw':<14}" + "".join(f"{titles[p]:>14}" for p in phases)]
    for name in RATIO_FIGURES:
        cells = []
        for phase in phases:
            value = table[phase][name]
            cells.append(f"{'n/a' if value is None else f'{value:.3g}x':>14}")
        lines.append(f"{RATIO_LABELS[name]:<14}" + "".join(cells))
    return "\n".join(lines)
