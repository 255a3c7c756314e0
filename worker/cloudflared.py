"""A quick Cloudflare Tunnel for the worker's service: `cloudflared tunnel --url SERVICE`.

cloudflared logs the URL it was given inside an ASCII box on standard error (the lines come
from `RunQuickTunnel` and `AsciiBox` in cloudflared's cmd/cloudflared/tunnel/quick_tunnel.go):

    2026-12-03T10:00:00Z INF +--------------------------------------------------------------+
    2026-12-03T10:00:00Z INF |  Your quick Tunnel has been created! Visit it at (it may ...  |
    2026-12-03T10:00:00Z INF |  https://blue-fox-12.trycloudflare.com                        |

A quick tunnel's URL is new every time cloudflared starts, so when the process dies it is
started again (with backoff) and the agent is told the new URL, which it republishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence

from dht_bridge.backoff import Backoff, ExponentialBackoff
from worker.errors import TunnelError

__all__ = ["CREATED", "QuickTunnel", "parse_quick_url"]

logger = logging.getLogger(__name__)

CREATED = "Your quick Tunnel has been created!"
_BOX_LINE = re.compile(r"\|\s+(https?://\S+?)\s+\|\s*$")
# How long a new cloudflared may take to print its URL (it asks trycloudflare.com first).
URL_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
# Only the tail of cloudflared's log is kept, for the error that says why it died.
LOG_TAIL = 20


def parse_quick_url(lines: Sequence[str]) -> str | None:
    """The URL in the box after the "quick Tunnel has been created" line, if printed yet."""
    for index, line in enumerate(lines):
        if CREATED in line:
            for following in lines[index + 1 : index + 3]:
                found = _BOX_LINE.search(following)
                if found:
                    return found.group(1)
    return None


class QuickTunnel:
    """Runs cloudflared for `service_url`, keeps it running, and reports each URL it gets.

    `on_url` is awaited with every URL after the first (the first is what `start` returns).
    """

    def __init__(
        self,
        service_url: str,
        *,
        binary: str = "cloudflared",
        on_url: Callable[[str], Awaitable[None]],
        backoff: ExponentialBackoff | None = None,
        rng: random.Random | None = None,
        url_timeout: float = URL_TIMEOUT,
    ) -> None:
        self.service_url = service_url
        self.binary = binary
        self.url: str | None = None
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._on_url = on_url
        self._retry = Backoff(
            backoff or ExponentialBackoff(base=1.0, cap=60.0), rng or random.Random()
        )
        self._url_timeout = url_timeout
        self._tail: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Start cloudflared and return its URL; TunnelError when it gives none in time."""
        url = await self._launch()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="cloudflared")
        return url

    async def aclose(self) -> None:
        """Stop watching and stop cloudflared (SIGTERM, then SIGKILL)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._terminate()

    async def _launch(self) -> str:
        argv = [self.binary, "tunnel", "--no-autoupdate", "--url", self.service_url]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            # A volunteer's first try, most often: say what to do about it.
            raise TunnelError(
                f"cannot run {self.binary!r}: not found. Install cloudflared "
                "(https://developers.cloudflare.com/cloudflare-one/connections/connect-networks/"
                "downloads/) or name it with --cloudflared-bin (RMA_CLOUDFLARED_BIN)"
            ) from exc
        except OSError as exc:
            raise TunnelError(f"cannot run {self.binary!r}: {exc}") from exc
        self._tail = []
        try:
            async with asyncio.timeout(self._url_timeout):
                url = await self._read_url()
        except TimeoutError:
            await self._terminate()
            raise TunnelError(
                f"cloudflared printed no quick-tunnel URL within {self._url_timeout:g} s"
            ) from None
        if url is None:
            code = await self.process.wait()
            raise TunnelError(f"cloudflared exited ({code}) before it printed a URL: {self._why()}")
        self.url = url
        logger.info("quick tunnel for %s: %s", self.service_url, url)
        return url

    async def _read_url(self) -> str | None:
        assert self.process is not None
        assert self.process.stderr is not None
        seen: list[str] = []
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._keep(text)
            seen.append(text)
            url = parse_quick_url(seen[-3:])
            if url is not None:
                return url
        return None

    async def _watch(self) -> None:
        """Drain cloudflared's log; when it dies, start it again and pass its new URL on."""
        while True:
            await self._drain()
            code = await self._exit_code()
            delay = self._retry.next()
            logger.warning(
                "cloudflared exited (%s): %s; starting it again in %.1f s", code, self._why(), delay
            )
            await asyncio.sleep(delay)
            try:
                url = await self._launch()
            except TunnelError as exc:
                logger.warning("%s", exc)
                continue
            self.restarts += 1
            self._retry.reset()
            await self._on_url(url)

    async def _drain(self) -> None:
        if self.process is None or self.process.stderr is None:
            return
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._keep(text)
            logger.debug("cloudflared: %s", text)

    async def _exit_code(self) -> int | None:
        return None if self.process is None else await self.process.wait()

    def _keep(self, line: str) -> None:
        self._tail = [*self._tail[-(LOG_TAIL - 1) :], line]

    def _why(self) -> str:
        errors = [line for line in self._tail if " ERR " in line or "error" in line.lower()]
        return (errors or self._tail or ["no output"])[-1]

    async def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
