"""Where a process keeps its state when not told: absolute paths, never the working directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["STATE_DIR_TEXT", "state_dir"]

# As `--help` and the docs show the default.
STATE_DIR_TEXT = "$STATE_DIRECTORY, else $XDG_STATE_HOME/rma, else ~/.local/state/rma"


def state_dir(environ: Mapping[str, str]) -> Path:
    """systemd's `StateDirectory=` (/var/lib/rma) when run as a unit, else the XDG state home."""
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd)
    xdg = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "~")) / ".local/state")
    return Path(xdg).expanduser() / "rma"
