"""The packages import downwards only: worker and edge_router use dht_bridge, nothing else
crosses, and only `rma` (the composition package) imports them all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of the project's other packages.
ALLOWED = {
    "dht_bridge": set(),
    "edge_router": {"dht_bridge"},
    "worker": {"dht_bridge"},
    "rma": {"dht_bridge", "edge_router", "worker"},
}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    others = set(ALLOWED) - {package}
    for path in sorted((ROOT / package).rglob("*.py")):
        crossing = (imported_packages(path) & others) - ALLOWED[package]
        assert not crossing, f"{path.relative_to(ROOT)} imports {sorted(crossing)}"
