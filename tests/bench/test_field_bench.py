"""Smoke test of bench/field_bench.py: a tiny run on the emulated internet finishes and writes
every figure for ours and for the stock library, labelled with its profile. How good the
figures are is the benchmark's business, not a test's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.support.bench import bench_module, run_bench_script

# Every run's figures, beside its operations and traffic.
RUN_FIGURES = (
    "nodes",
    "clients",
    "servers",
    "coordinators",
    "median_rtt_ms",
    "build_s",
    "join_failures",
    "published_pct",
    "window_s",
    "heartbeat_s",
    "settle_s",
    "settle_b_s",
    "traffic",
    "ops",
    "loop_lag_p50_ms",
    "loop_lag_p99_ms",
    "loss_seen_pct",
    "heartbeats",
    "churn",
    "sessions",
)
TRAFFIC_FIGURES = ("nodes", "bytes_s_mean", "bytes_s_p99", "sent_bytes_s_mean")


def test_field_bench_writes_every_figure_under_its_profile(tmp_path: Path) -> None:
    out = tmp_path / "field.json"
    result = run_bench_script(
        "field_bench.py",
        *("--profile", "continent", "--nodes", "14", "--coordinators", "2"),
        *("--lookups", "12", "--window", "2", "--heartbeat", "1", "--out", str(out)),
        *("--settle", "1"),
        # Sessions short enough that workers crash, leave and restart within the run.
        *("--session-median", "1", "--session-dist", "lognormal"),
        timeout=300,
    )
    data = json.loads(out.read_text())
    assert data["profile"]["name"] == "continent"
    assert data["profile_line"].startswith("continent: ")
    assert result.stdout.count("continent: ") >= 2  # printed first, and over the tables
    figures = data["figures"]
    assert set(figures) == {"ours", "stock"}
    report = bench_module("field_bench_report")
    ours, stock = figures["ours"], figures["stock"]
    for run in (ours, stock):
        assert all(run.get(name) is not None for name in RUN_FIGURES), run
        assert run["nodes"] == 14
        for name, ops in run["ops"].items():
            assert set(report.OP_FIGURES) <= set(ops)
            if name == "warm_discover":
                # Only readers still up since they filled their caches ask (1 s sessions here).
                assert 0 < ops["count"] <= 12
            else:
                assert ops["count"] == 12
        for traffic in run["traffic"].values():
            assert set(TRAFFIC_FIGURES) <= set(traffic)
            assert traffic["bytes_s_mean"] > 0
        assert set(report.CHURN_FIGURES) <= set(run["churn"])
        assert run["settle_s"] == 1
        assert all(bps > 0 for bps in run["settle_b_s"].values()), run["settle_b_s"]
        assert run["churn"]["crashes"] + run["churn"]["leaves"] > 0
    assert set(ours["ops"]) == {"service_lookup", "record_get", "warm_discover"}
    assert ours["ops"]["warm_discover"]["local_pct"] > 0
    assert set(stock["ops"]) == {"record_get"}
    assert set(ours["traffic"]) == {"client", "server", "coordinator"}
    assert (ours["clients"], stock["clients"]) == (11, 0)
    assert ours["churn"]["restarts"] > 0
    assert ours["sessions"].startswith("lognormal sessions")
    assert "p50 RTT" in result.stdout


def test_field_bench_runs_simulated_time_on_the_virtual_clock_in_two_processes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "field-virtual.json"
    window = 1800.0
    result = run_bench_script(
        "field_bench.py",
        *("--profile", "world", "--nodes", "14", "--coordinators", "2", "--virtual"),
        *("--lookups", "12", "--window", str(window), "--out", str(out)),
        *("--session-median", "300", "--uplink", "1e6", "--jobs", "2"),
        timeout=300,
    )
    data = json.loads(out.read_text())
    assert data["clock"] == "virtual"
    # Ours and the stock library ran as two processes; one report holds both.
    assert set(data["figures"]) == {"ours", "stock"}
    assert data["figures"]["ours"]["pid"] != data["figures"]["stock"]["pid"]
    tables = result.stdout.split("world: ", 2)
    assert len(tables) == 3, result.stdout  # the profile, then over the tables: once each
    assert re.search(r"^ours +service_lookup", tables[2], re.M)
    assert re.search(r"^stock +record_get", tables[2], re.M)
    for run in data["figures"].values():
        assert run["clock"] == "virtual"
        # A 1 MB/s line is far above what 14 nodes send: nothing dropped, for either.
        assert (run["uplink_b_s"], run["uplink_overflow"]) == (1e6, 0)
        assert all(run.get(name) is not None for name in RUN_FIGURES), run
        # Half an hour of heartbeats and churn, in the loop's seconds and far fewer real ones.
        assert run["window_s"] == window
        assert run["loop_s"] > window + run["settle_s"] > 10 * run["wall_s"]
        assert run["heartbeats"] >= 12 * window / 30 * 0.5
        assert run["loop_lag_p99_ms"] == 0
        assert run["churn"]["restarts"] > 0
    # Our lookups cross the world: at least one median round trip each (the stock gets of
    # 14 nodes are answered locally: every node holds every key).
    for kind in ("service_lookup", "record_get"):
        assert data["figures"]["ours"]["ops"][kind]["p50_rtts"] >= 1


def test_field_bench_runs_the_stock_library_alone(tmp_path: Path) -> None:
    out = tmp_path / "field-stock.json"
    result = run_bench_script(
        "field_bench.py",
        *("--profile", "world", "--nodes", "14", "--coordinators", "2", "--virtual"),
        *("--lookups", "12", "--window", "30", "--settle", "30", "--no-ours"),
        *("--uplink", "1e5", "--progress", "0.01", "--out", str(out)),
        timeout=300,
    )
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"stock"}
    # The watch's lines, between the phases' own (a long run says where it is).
    assert re.search(
        r"stock: 14 hosts, \d+ workers listed, datagrams sent [\d,]+, dropped at full lines",
        result.stderr,
    )
    assert figures["stock"]["ops"]["record_get"]["count"] == 12
    assert "uplink: 100000 B/s per host, 0.2 s buffer" in result.stdout


def test_field_bench_runs_on_a_dilated_clock(tmp_path: Path) -> None:
    out = tmp_path / "field-dilated.json"
    run_bench_script(
        "field_bench.py",
        *("--profile", "continent", "--nodes", "10", "--coordinators", "2", "--no-stock"),
        *("--lookups", "6", "--window", "1", "--heartbeat", "1", "--settle", "1"),
        *("--no-churn", "--dilate", "3", "--out", str(out)),
        timeout=300,
    )
    data = json.loads(out.read_text())
    ours = data["figures"]["ours"]
    assert data["clock"] == ours["clock"] == "dilated3"
    # Each of the loop's seconds lasted three real ones.
    assert ours["wall_s"] >= 3 * ours["loop_s"] * 0.95
    assert ours["ops"]["record_get"]["count"] == 6


def test_field_bench_refuses_a_dilation_below_one_or_with_the_virtual_clock() -> None:
    field_bench = bench_module("field_bench")
    assert field_bench.main(["--dilate", "0.5"]) == 2
    assert field_bench.main(["--virtual", "--dilate", "2"]) == 2
