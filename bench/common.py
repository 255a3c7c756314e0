"""What every benchmark here shares: the machine facts, one quantile, strict JSON and tables.

The scripts run as `python bench/<name>.py`, so bench/ is first on `sys.path` and they import
this module as `common`. Importing it also puts the checkout right after bench/, so that our
packages and the test helpers some benchmarks reuse are this tree's, whatever the install is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Self

__all__ = [
    "ROOT",
    "BenchError",
    "ChildProcess",
    "HelpFormatter",
    "json_safe",
    "machine",
    "markdown_table",
    "quantile",
    "read_stdin",
    "text_table",
    "write_json",
]

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))


class BenchError(RuntimeError):
    """The benchmark could not finish: a process failed, a time limit passed, a check failed."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help; the docstring's example keeps its line breaks."""


class ChildProcess:
    """A child process of the benchmark (`script --child ARGS` with this interpreter) and its
    channel: commands go down its stdin and answers come back on its stdout, one JSON line
    each (up to `limit` bytes)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process

    @classmethod
    async def spawn(cls, name: str, script: Path, *args: str, limit: int) -> Self:
        """Start `script --child ARGS`."""
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, str(script), "--child", *args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=limit,
        )
        return cls(name, process)

    async def send(self, message: dict[str, Any]) -> None:
        """One command."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    async def receive(self, during: str) -> Any:
        """The next answer; BenchError if the child exited instead (`during` says what it was
        doing)."""
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise BenchError(f"{self.name} exited with {code} during {during}")
        return json.loads(line)

    async def ask(self, op: str, *, timeout: float) -> Any:  # noqa: ASYNC109 - per command
        """Send command `op` and wait up to `timeout` seconds for its answer."""
        await self.send({"op": op})
        async with asyncio.timeout(timeout):
            return await self.receive(op)

    async def wait_or_kill(self, grace: float) -> None:
        """Wait up to `grace` seconds for the child to exit, then kill it."""
        if self.process.returncode is None:
            try:
                async with asyncio.timeout(grace):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def read_stdin(limit: int) -> asyncio.StreamReader:
    """A child's end of its channel: this process's stdin as a stream on the running loop."""
    reader = asyncio.StreamReader(limit=limit)
    protocol = asyncio.StreamReaderProtocol(reader)
    await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, sys.stdin)
    return reader


def machine(*packages: str, **extra: Any) -> dict[str, Any]:
    """Where the figures were measured: cores, load, Python, OS, the versions of `packages`
    that are installed, and `extra` facts of the benchmark's own."""
    versions = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
        **versions,
    }


def quantile(values: Iterable[float], q: float, *, empty: float = 0.0) -> float:
    """Nearest-rank quantile (`q` in 0..1, 0 the minimum, 1 the maximum) of `values`, which
    need not be sorted; `empty` when there are none."""
    ordered = sorted(values)
    if not ordered:
        return empty
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


def json_safe(value: Any) -> Any:
    """NaN and infinities become None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """The figures as strict JSON (NaN and infinities as null, paths as strings), creating the
    directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, default=str) + "\n")
    logger.info("wrote %s", path)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: one line per row, cells as given (already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> str:
    """A fixed-width table: `columns` are (title, alignment and width, e.g. ">8"); the header,
    a rule as long as it, then each row's cells (already formatted) aligned alike."""
    header = " ".join(f"{title:{spec}}" for title, spec in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = zip(row, columns, strict=True)
        lines.append(" ".join(f"{cell!s:{spec}}" for cell, (_, spec) in cells))
    return "\n".join(lines)
