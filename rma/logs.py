"""Logging for every `rma` process: one format, one level option."""

from __future__ import annotations

from dht_bridge.options import Option

__all__ = ["LOG_FORMAT", "LOG_LEVEL", "LOG_LEVELS"]

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")

LOG_LEVEL = Option(
    "log_level",
    "LOG_LEVEL",
    "logging level; before the subcommand (rma --log-level debug router), or after it for "
    "rma worker",
    default="info",
    choices=LOG_LEVELS,
)
