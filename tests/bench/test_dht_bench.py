"""Smoke test of bench/dht_bench.py: a tiny run of both implementations finishes and writes
every figure for both phases. How fast is the benchmark's business, not a test's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.bench import run_bench_script

# The figures every row must carry (the table's columns and what the ratios are made of).
FIGURES = (
    "nodes",
    "procs",
    "build_s",
    "join_p50_ms",
    "join_p99_ms",
    "join_failures",
    "lookups",
    "lookup_p50_ms",
    "lookup_p95_ms",
    "lookup_p99_ms",
    "lookup_max_ms",
    "success_pct",
    "timeouts",
    "hops_mean",
    "mem_per_node_kb",
    "stored_kb_mean",
    "stored_kb_max",
    "pkts_per_lookup",
    "idle_bytes_per_node_s",
    "alive_nodes",
)
RATIOS = (
    "build_s",
    "join_p50_ms",
    "join_p99_ms",
    "lookup_p50_ms",
    "lookup_p95_ms",
    "lookup_p99_ms",
    "lookup_max_ms",
    "success_pct",
    "mem_per_node_kb",
    "pkts_per_lookup",
    "idle_bytes_per_node_s",
)
LOOKUPS = 20


def run_bench(out: Path, *extra: str, impl: str = "both") -> subprocess.CompletedProcess[str]:
    """A tiny run; its own deadlines bound it well inside the subprocess timeout."""
    return run_bench_script(
        "dht_bench.py",
        *extra,
        *("--nodes", "30", "--procs", "2", "--lookups", str(LOOKUPS), "--impl", impl),
        *("--deadline", "10", "--idle", "0.5", "--time-limit", "90"),
        *("--log-level", "WARNING", "--out", str(out)),
        timeout=110,
    )


def test_dht_bench_writes_every_figure_for_both_impls_and_phases(tmp_path: Path) -> None:
    out = tmp_path / "dht.json"
    result = run_bench(out)
    assert "ours/raw" in result.stdout

    data = json.loads(out.read_text())
    rows = {(r["impl"], r["phase"], r["kind"]): r for r in data["rows"]}
    wanted = [(impl, phase, "get") for impl in ("ours", "raw") for phase in ("before", "after")]
    wanted += [("ours", phase, "service") for phase in ("before", "after")]
    for key in wanted:
        row = rows[key]
        for name in FIGURES:
            value = row[name]
            if key[0] == "raw" and name == "hops_mean":
                assert value is None  # the stock library does not report hops
                continue
            assert isinstance(value, int | float), f"{key} {name} = {value!r}"
        expected = LOOKUPS // 4 if key[2] == "service" else LOOKUPS
        assert row["lookups"] == expected
        assert 0 < row["stored_kb_mean"] <= row["stored_kb_max"]
        assert row["nodes"] == 30
        assert row["procs"] == 2

    for phase in ("before", "after"):
        assert set(RATIOS) <= set(data["ratios"][phase])
    assert data["params"]["nodes_per_proc"] == [15, 15]
    assert {"cpu_count", "python", "kademlia"} <= set(data["machine"])


def test_dht_bench_runs_a_mixed_network_of_servers_and_clients(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    result = run_bench(out, "--servers", "0.3", impl="ours")
    assert "30% servers, the rest clients" in result.stdout

    data = json.loads(out.read_text())
    assert data["params"]["servers"] == 0.3
    rows = {(r["phase"], r["kind"]): r for r in data["rows"]}
    assert set(rows) == {(p, k) for p in ("before", "after") for k in ("get", "service")}
    for row in rows.values():
        for name in FIGURES:
            assert isinstance(row[name], int | float), f"{name} = {row[name]!r}"
        assert row["servers_share"] == 0.3
        # Clients are nobody's contact: no table holds one, no request ever reached one.
        assert row["clients_in_tables"] == 0
        assert row["requests_to_clients"] == 0
