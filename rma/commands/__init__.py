"""One module per `rma` subcommand, each with `configure(parser)` and `run(args) -> int`."""

from __future__ import annotations
