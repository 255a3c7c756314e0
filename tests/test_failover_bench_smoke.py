"""Smoke test of bench/failover_bench.py: one tiny failover per topology writes every figure.
How fast a failover completes belongs to the benchmark, not to a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "failover_bench.py"


def test_failover_bench_measures_both_topologies(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    command = [
        *(sys.executable, str(SCRIPT), "--rounds", "1", "--records", "10"),
        *("--deadline", "60", "--out", str(out)),
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
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
