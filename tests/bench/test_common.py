"""bench/common.py, what every benchmark shares: one quantile, strict JSON, the tables; and no
script keeps its own copy of them."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from tests.support.bench import BENCH, bench_module

common = bench_module("common")
# What lives in common.py alone.
SHARED = {"machine", "quantile", "percentile", "json_safe", "write_json", "BenchError"}


def test_quantile_is_nearest_rank_whatever_the_order() -> None:
    twenty = [float(x) for x in range(20, 0, -1)]
    assert common.quantile(twenty, 0.5) == 10.0
    assert common.quantile(twenty, 0.95) == 19.0
    assert common.quantile(twenty, 0.99) == 20.0  # p99 of 20 is the slowest of them
    assert common.quantile(range(1, 201), 0.99) == 198.0
    assert common.quantile(twenty, 0.0) == 1.0
    assert common.quantile(twenty, 1.0) == 20.0


def test_quantile_of_nothing_is_the_given_empty_value() -> None:
    assert common.quantile([], 0.5) == 0.0
    assert math.isnan(common.quantile([], 0.5, empty=math.nan))


def test_write_json_is_strict_and_creates_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "results" / "x.json"
    common.write_json(out, {"p99": math.nan, "rows": [(1, math.nan)], "out": out})

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    data = json.loads(out.read_text(), parse_constant=refuse)
    assert data == {"p99": None, "rows": [[1, None]], "out": str(out)}


def test_machine_names_the_cores_python_and_installed_versions() -> None:
    facts = common.machine("pytest", "no-such-package-here", impl="x")
    assert {"cpu_count", "load_avg_at_end", "python", "platform"} <= set(facts)
    assert facts["pytest"] == pytest.__version__
    assert "no-such-package-here" not in facts
    assert facts["impl"] == "x"


def test_tables() -> None:
    assert common.markdown_table(("a", "b"), [(1, "x"), (2, "y")]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |"
    )
    assert common.text_table([("n", ">3"), ("name", "<5")], [(7, "ab")]) == (
        "  n name \n---------\n  7 ab   "
    )


SCRIPTS = sorted(path for path in BENCH.glob("*.py") if path.name != "common.py")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_script_keeps_its_own_copy_of_what_common_shares(path: Path) -> None:
    tree = ast.parse(path.read_text())
    defined = {
        node.name.lstrip("_")
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    assert not defined & SHARED, f"{path.name} defines {defined & SHARED}: use common"
