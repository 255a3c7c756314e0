"""Smoke test of bench/attack_bench.py: a tiny network under a small flood, eclipse and storage
fill finishes, writes every phase's figures, keeps every provider and lists a newcomer (the
script exits 1 if not)."""

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
        *("--fill", "300", "--fill-keys", "200"),
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
    # The storage fill: the coordinator keeps its last half for others, and lists a newcomer;
    # the reference without quotas is taken whole and refuses a worker's new keys.
    fill = data["fill"]
    assert fill["bridge_kept"] <= 100
    assert fill["newcomer_listed_s"] is not None
    assert fill["reference_kept"] > 190
    assert fill["reference_took_of_4"] == 0
