"""Running a `bench/` script as its smoke tests do: a subprocess from the project root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `bench/<name>` with this interpreter; it must exit 0 (its stderr tail says why not)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result
