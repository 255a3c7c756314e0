"""Smoke test of bench/start_bench.py: a tiny run of real agents' first starts on the emulated
internet finishes, puts every start on the DHT and, through the coordinators' bridges, in the
registry the edge reads, and writes its figures beside the bare node's.
How fast the starts are is the benchmark's business, not a test's."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.bench import run_bench_script


def test_start_bench_writes_the_agents_and_the_bare_nodes_starts(tmp_path: Path) -> None:
    out = tmp_path / "start.json"
    result = run_bench_script(
        "start_bench.py",
        *("--profile", "continent", "--nodes", "12", "--starts", "3", "--out", str(out)),
        timeout=300,
    )
    assert "agent / bare node, p50:" in result.stdout
    figures = json.loads(out.read_text())["figures"]
    assert figures["profile"].startswith("continent: ")
    for kind in ("agent", "bare"):
        starts = figures[kind]["starts"]
        assert len(starts) == 3
        assert all(s["mode"] == "dht" and s["published"] > 0 for s in starts), starts
        # Listed at the edge: a record never seen in the registry is written as null.
        assert all(s["seconds"] is not None and s["seconds"] > 0 for s in starts), starts
        assert figures[kind]["never_listed"] == 0
        assert figures[kind]["p50_s"] > 0
    # Each fresh agent asked the edge once (for peers), and no bare node did.
    assert [s["edge_requests"] for s in figures["agent"]["starts"]] == [1, 1, 1]
    assert all(s["returned"] >= s["published"] for s in figures["agent"]["starts"])
