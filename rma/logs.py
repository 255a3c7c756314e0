"""Logging for every `rma` process: one handler for ours and uvicorn's lines, as text or as
one JSON object a line, and the options that choose."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from dht_bridge.logcontext import log_fields
from dht_bridge.options import Option

__all__ = [
    "LOG_FORMAT",
    "LOG_FORMATS",
    "LOG_LEVEL",
    "LOG_LEVELS",
    "LOG_STYLE",
    "JsonFormatter",
    "configure_logging",
]

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

LOG_LEVEL = Option(
    "log_level",
    "LOG_LEVEL",
    "logging level; before the subcommand (rma --log-level debug router), or after it for "
    "rma worker",
    default="info",
    choices=LOG_LEVELS,
)
LOG_STYLE = Option(
    "log_format",
    "LOG_FORMAT",
    "text, or json: one object a line with the time, level, logger, message and the "
    "request's CF-Ray or the worker id where known",
    default="text",
    choices=LOG_FORMATS,
)
# Libraries that log a line per request or per datagram at info.
QUIET = ("httpx", "httpcore", "kademlia", "rpcudp")


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs, told apart from anyone else's."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line: what log shippers (journald, Loki, CloudWatch) parse as is."""

    def format(self, record: logging.LogRecord) -> str:
        """The record and the context's fields as one line of JSON."""
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **log_fields(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, style: str = "text") -> None:
    """One handler on the root logger; uvicorn's loggers propagate to it (uvicorn is given no
    logging configuration of its own), so every line has one format."""
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if style == "json" else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    # Replace only a handler of ours (a second call): others (pytest's capture) stay.
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _OurHandler)] + [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
