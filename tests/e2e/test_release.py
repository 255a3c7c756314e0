"""What a release carries: one version everywhere, a licence, a changelog entry."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest

from dht_bridge import __version__
from rma.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_the_version_is_the_same_in_the_package_its_metadata_and_the_worker() -> None:
    assert metadata.version("rma-discovery") == __version__
    package = json.loads((ROOT / "wrangler" / "package.json").read_text())
    assert package["version"] == __version__


def test_rma_version_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rma {__version__}"


def test_the_licence_and_a_changelog_entry_for_this_version_ship() -> None:
    assert metadata.metadata("rma-discovery")["License-Expression"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()
