"""Smoke test of bench/failover_bench.py: one tiny failover per topology writes every figure.
How fast a failover completes belongs to the benchmark, not to a test."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.bench import run_bench_script


def test_failover_bench_measures_both_topologies(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    result = run_bench_script(
        "failover_bench.py",
        *("--rounds", "1", "--records", "10", "--deadline", "60", "--out", str(out)),
        timeout=110,
    )
    assert "| sentinel |" in result.stdout
    assert "| cluster |" in result.stdout
    data = json.loads(out.read_text())
    for kind in ("sentinel", "cluster"):
        row = data["topologies"][kind]
        (one,) = row["rounds"]
        assert one["first_registration_s"] > 0
        assert one["failed_attempts"] >= 1  # the primary was really gone for a while
        assert 0 <= one["kept"] <= 10
        assert row["detection_s"] > 0
    assert {"cpu_count", "python"} <= set(data["machine"])
