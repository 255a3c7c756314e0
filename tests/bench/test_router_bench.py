"""Smoke test of bench/router_bench.py: a tiny run measures every case and writes every figure.
How fast the router is belongs to the benchmark, not to a test."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.bench import run_bench_script

CASES = ("bare", "hit", "redis", "dht", "direct")
FIGURES = ("p50_ms", "p99_ms", "mean_ms", "rps", "ok_pct", "requests", "total")
ROUTER_FIGURES = ("backend_reads_per_req", "dht_reads_per_req")
RATIOS = ("p50_x", "p99_x", "rps_share")


def test_router_bench_measures_every_case(tmp_path: Path) -> None:
    out = tmp_path / "router.json"
    result = run_bench_script(
        "router_bench.py",
        *("--seconds", "0.5", "--warmup", "0.2", "--clients", "4"),
        *("--providers", "4", "--dht-nodes", "4", "--log-level", "WARNING", "--out", str(out)),
        timeout=55,
    )
    assert "req/s / bare" in result.stdout

    data = json.loads(out.read_text())
    rows = {row["case"]: row for row in data["rows"]}
    assert tuple(rows) == CASES
    for case, row in rows.items():
        names = FIGURES + (ROUTER_FIGURES if case in ("hit", "redis", "dht") else ())
        for name in names:
            assert isinstance(row[name], int | float), f"{case} {name} = {row[name]!r}"
        assert row["requests"] > 0
        assert row["ok_pct"] > 0
    assert set(data["ratios"]) == set(CASES) - {"bare"}
    for case, ratio in data["ratios"].items():
        for name in RATIOS:
            assert isinstance(ratio[name], float), f"{case} {name} = {ratio[name]!r}"
    assert data["params"]["clients"] == 4
    assert data["params"]["body_bytes"] > 0
    assert {"cpu_count", "python", "http_impl"} <= set(data["machine"])
