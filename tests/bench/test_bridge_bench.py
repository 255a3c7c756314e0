"""Smoke test of bench/bridge_bench.py: a tiny run measures both scenarios and writes every
figure. How fast the bridge converges belongs to the benchmark, not to a test."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.bench import run_bench_script

FIGURES = ("publish_round_s", "baseline_write_s", "baseline_sweep_s", "initial_fill_s")
SCENARIO_FIGURES = ("converge_s", "passes", "x_baseline_write")


def test_bridge_bench_measures_both_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "bridge.json"
    result = run_bench_script(
        "bridge_bench.py",
        *("--records", "24", "--nodes", "6"),
        *("--sync-interval", "1", "--probe-interval", "0.5", "--deadline", "30"),
        *("--time-limit", "80", "--out", str(out)),
        timeout=100,
    )
    assert "dht_partition" in result.stdout
    assert "redis_outage" in result.stdout

    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["records"] == 24
    for name in FIGURES:
        assert isinstance(row[name], int | float), f"{name} = {row[name]!r}"
    for scenario in ("dht_partition", "redis_outage"):
        for name in SCENARIO_FIGURES:
            value = row[scenario][name]
            assert isinstance(value, int | float), f"{scenario} {name} = {value!r}"
        assert row[scenario]["converge_s"] > 0
    assert row["redis_outage"]["replayed"] >= 24
    assert row["figures"]["rma_bridge_journal_dropped_total"] == 0
    assert {"cpu_count", "python"} <= set(data["machine"])
