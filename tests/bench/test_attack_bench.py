"""Smoke test of bench/attack_bench.py: a tiny network under a small flood and eclipse
finishes, writes both phases' figures, and keeps every provider (the script exits 1 if not)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.bench import run_bench_script


def test_attack_bench_keeps_every_provider_under_a_small_flood_and_eclipse(
    tmp_path: Path,
) -> None:
    out = tmp_path / "attack.json"
    result = run_bench_script(
        "attack_bench.py",
        *("--nodes", "16", "--providers", "3", "--sybils", "160", "--eclipse", "12"),
        *("--lookups", "20", "--interval", "1", "--ttl", "3", "--router-checks", "2"),
        *("--time-limit", "100", "--out", str(out)),
        timeout=120,
    )
    assert "router keeps 3 of 3" in result.stdout
    data = json.loads(out.read_text())["result"]
    for phase in ("baseline", "attacked"):
        assert data[phase]["lookups"] == 20
        assert data[phase]["complete_pct"] >= 99.0
    assert data["attacked"]["router_all"] is True
    assert data["flood_asked"] > 0
