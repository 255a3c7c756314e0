"""The project's version: written here once, read by the build and by every process."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.2.0"
