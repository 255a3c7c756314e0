"""The exit codes of every `rma` subcommand, in one place (scripts and supervisors read them)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Exit"]


class Exit(IntEnum):
    """What an `rma` process's exit status means."""

    OK = 0
    # A run that started and then failed (a flush some router refused, say).
    FAILURE = 1
    # Bad flags or configuration: nothing was started.
    USAGE = 2
    # The process could not start: a port taken, no bootstrap peer, no Redis.
    START_FAILED = 3
