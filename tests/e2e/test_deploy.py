"""The example deployment files: systemd accepts the units, and they name only real options."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rma.reference import TABLES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
KNOWN = {option.variable for table in TABLES.values() for option in table if option.variable}
KNOWN_FLAGS = {option.option_string for table in TABLES.values() for option in table}


def test_there_are_units_and_an_environment_file() -> None:
    assert {u.name for u in UNITS} >= {"rma-router.service", "rma-bridge.service"}
    assert (DEPLOY / "rma.env").is_file()


def test_every_variable_the_environment_file_sets_is_an_option() -> None:
    named = re.findall(r"^#?\s*(RMA_[A-Z_]+)=", (DEPLOY / "rma.env").read_text(), re.MULTILINE)
    assert named
    assert set(named) <= KNOWN, set(named) - KNOWN


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_every_flag_a_unit_passes_is_an_option(unit: Path) -> None:
    exec_start = re.search(r"^ExecStart=(.*)$", unit.read_text(), re.MULTILINE)
    assert exec_start is not None
    flags = set(re.findall(r"(--[a-z-]+)", exec_start.group(1)))
    assert flags <= KNOWN_FLAGS, flags - KNOWN_FLAGS


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verifies_each_unit(unit: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's `rma`.
    rma = Path(sys.executable).parent / "rma"
    text = unit.read_text().replace("/opt/rma/.venv/bin/rma", str(rma))
    name = unit.name.replace("@.service", "@ocr.service")
    target = tmp_path / unit.name
    target.write_text(text)
    where = tmp_path / name
    if name != unit.name:
        where.symlink_to(target)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(where)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Lines about other units of the host (the machine's own configuration) are not ours.
    ours = [line for line in result.stderr.splitlines() if unit.name.split("@")[0] in line]
    assert result.returncode == 0, result.stderr
    assert not ours, result.stderr
