"""Smoke test of bench/worker_bench.py: a tiny run finishes and writes every figure, for the
agents and for the edge-only baseline. How good the figures are is the benchmark's business."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_bench_script

FIGURES = (
    "workers",
    "procs",
    "scale",
    "window_real_s",
    "join_s",
    "join_one_ms_p50",
    "join_one_ms_p99",
    "join_edge_per_worker",
    "steady_edge_requests",
    "router_seen_requests",
    "edge_per_worker_day",
    "edge_per_day_all_workers",
    "edge_per_day_20_workers",
    "dht_bytes_per_worker_s_mean",
    "dht_bytes_per_worker_s_p95",
    "dht_bytes_per_worker_s_max",
    "dht_bytes_per_heartbeat",
    "dht_bytes_per_worker_s_nominal",
    "coordinator_bytes_s_each",
    "heartbeats_per_worker_min",
    "workers_on_dht",
    "rpc_reprieves",
)


def test_worker_bench_writes_every_figure_and_the_targets(tmp_path: Path) -> None:
    out = tmp_path / "worker.json"
    result = run_bench_script(
        "worker_bench.py",
        *("--workers", "4", "--procs", "2", "--scale", "30"),
        *("--window", "90", "--baseline-window", "60", "--out", str(out)),
        timeout=100,
    )
    assert "< 25 edge requests a day for 20 workers" in result.stdout
    assert "< 1 KB/s per worker" in result.stdout
    assert "agent/baseline" in result.stdout

    data = json.loads(out.read_text())
    rows = {row["kind"]: row for row in data["rows"]}
    assert set(rows) == {"agent", "edge-only"}
    for row in rows.values():
        for name in FIGURES:
            assert isinstance(row[name], int | float), f"{row['kind']} {name} = {row[name]!r}"
        assert row["workers"] == 4
    assert isinstance(rows["agent"]["restart_edge_per_worker"], int | float)
    assert "Where the DHT bytes go" in result.stdout
    spent = rows["agent"]["rpc_bytes_per_heartbeat"]
    # Heartbeats are renewals or STOREs; either way the tally names them and sums to the total.
    assert spent.get("store", 0) + spent.get("renew", 0) > 0, spent
    assert sum(spent.values()) == pytest.approx(rows["agent"]["dht_bytes_per_heartbeat"], abs=5)
    assert rows["agent"]["rpc_bytes_per_heartbeat_top5pct"]
    assert "holders" in rows["agent"]["crawl_queries_per_heartbeat"]
    # Four services on seven nodes: every node holds every root shard.
    assert rows["agent"]["shard_levels_held"]["all"] > 0
    assert rows["agent"]["shard_levels_held"]["level 0"] > 0
    assert rows["edge-only"]["steady_edge_requests"] > 0  # the baseline heartbeats at the edge
    assert data["targets"] == {
        "edge_per_day_20_workers": 25,
        "dht_bytes_per_worker_s": 1024,
        "bootstrap_s": 2.0,
    }
