"""Smoke test of bench/router_bench.py: a tiny run measures every case and writes every figure.
How fast the router is belongs to the benchmark, not to a test."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.bench import run_bench_script

LOOKUP_CASES = ("bare", "hit", "redis", "direct")
ROUTE_CASES = ("nginx", "route")
FIGURES = ("p50_ms", "p99_ms", "mean_ms", "rps", "ok_pct", "requests", "failed")
RATIOS = ("p50_x", "p99_x", "rps_share")


def test_router_bench_measures_every_case(tmp_path: Path) -> None:
    out = tmp_path / "router.json"
    result = run_bench_script(
        "router_bench.py",
        *("--seconds", "1", "--warmup", "0", "--clients", "4", "--providers", "4"),
        *("--log-level", "WARNING", "--out", str(out)),
        timeout=120,
    )
    assert "req/s / ref" in result.stdout

    data = json.loads(out.read_text())
    rows = {row["case"]: row for row in data["rows"]}
    nginx = data["params"]["upstream"] == "nginx"
    cases = LOOKUP_CASES + (ROUTE_CASES if nginx else ("route",))
    assert set(rows) == set(cases)
    for case, row in rows.items():
        for name in FIGURES:
            assert isinstance(row[name], int | float), f"{case} {name} = {row[name]!r}"
        assert row["requests"] > 0
        assert row["failed"] == 0, f"{case}: {row}"
    for case in ("hit", "redis", "route"):
        assert isinstance(rows[case]["backend_reads_per_req"], float)
    for case, ratio in data["ratios"].items():
        for name in RATIOS:
            assert isinstance(ratio[name], float), f"{case} {name} = {ratio[name]!r}"
    if nginx:
        # Kept-alive upstream connections: far fewer new ones than requests.
        assert rows["route"]["upstream_conns_per_1k"] < 100
        assert {"hit", "redis", "route"} <= set(data["added_us"])
    else:
        assert any("nginx" in note for note in data["params"]["notes"])
    assert data["params"]["clients"] == 4
    assert data["params"]["body_bytes"] > 0
    assert {"cpu_count", "python", "http_impl"} <= set(data["machine"])


def test_router_bench_serves_every_case_on_uvloop(tmp_path: Path) -> None:
    # The router and its references on one loop (--loop); /route once failed on uvloop.
    out = tmp_path / "router.json"
    run_bench_script(
        "router_bench.py",
        *("--seconds", "1", "--warmup", "0", "--clients", "4", "--providers", "4"),
        *("--loop", "uvloop", "--log-level", "WARNING", "--out", str(out)),
        timeout=120,
    )
    data = json.loads(out.read_text())
    assert data["machine"]["loop"] == "uvloop"
    assert all(row["failed"] == 0 and row["requests"] > 0 for row in data["rows"])
    assert {"bare", "hit", "redis", "route"} <= {row["case"] for row in data["rows"]}
