"""Running a `bench/` script as its smoke tests do (a subprocess from the project root), and
importing a bench module (bench/ is not a package: its scripts import each other by name)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def run_bench_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `bench/<name>` with this interpreter; it must exit 0 (its stderr tail says why not)."""
    result = subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def bench_module(name: str) -> ModuleType:
    """Import `bench/<name>.py` as the scripts do, with bench/ on `sys.path`."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    return importlib.import_module(name)
