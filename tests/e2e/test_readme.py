"""The README stays a guide: under 200 lines, its links inside the repository, and every name
its embedding example imports importable from a clean install."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text("utf-8")


def test_the_readme_is_under_200_lines() -> None:
    assert len(README.splitlines()) < 200


def test_every_name_the_readme_imports_exists() -> None:
    imports = re.findall(r"^from ([\w.]+) import ([\w, ]+)$", README, re.MULTILINE)
    assert imports, "the README shows no embedding example"
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(loaded, name), f"{module}.{name}"
            assert name in getattr(loaded, "__all__", ()), f"{module}.{name} is not public"


def test_every_link_in_the_docs_points_inside_the_repository() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)]+)\)", doc.read_text("utf-8")):
            path = target.split("#")[0]
            if not path or path.startswith(("http://", "https://", "mailto:")):
                continue
            assert (doc.parent / path).resolve().is_relative_to(ROOT), f"{doc.name}: {target}"
            assert (doc.parent / path).exists(), f"{doc.name}: {target} does not exist"
