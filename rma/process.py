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
