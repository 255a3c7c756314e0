"""Process plumbing shared by the `rma` subcommands: run until SIGTERM/SIGINT, then stop cleanly."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT received by this process."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopped.set)
    try:
        await stopped.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_service(main: Callable[[asyncio.Event], Coroutine[Any, Any, int]]) -> int:
    """Run `main(stop)` under asyncio.run; `stop` is set on SIGTERM/SIGINT."""

    async def runner() -> int:
        stop = asyncio.Event()

        async def watch() -> None:
            await wait_for_stop_signal()
            stop.set()

        watcher = asyncio.get_running_loop().create_task(watch(), name="signal-watch")
        try:
            return await main(stop)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    return asyncio.run(runner())


def parse_hostport(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to a tuple; ValueError names the bad input."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)
