"""Headless Chromium for tests, driven through chromedriver's W3C WebDriver HTTP API with httpx.

Debian's `chromium` and `chromium-driver` packages (scripts/test installs them when missing).
No browser is downloaded from anywhere else, and no WebDriver library is needed: the handful of
endpoints used here are plain JSON over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

from tests.support.helpers import wait_for

START_TIMEOUT = 30.0  # chromedriver, then Chromium, on a loaded 2-core machine
COMMAND_TIMEOUT = 60.0
WINDOW = (1440, 1100)
# As the machine notes say: headless as root, and nothing reaching out to Google's hosts.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)
PORT_LINE = re.compile(rb"started successfully on port (\d+)")


@dataclass(frozen=True)
class BrowserBinaries:
    """Where Chromium and its driver are."""

    chromium: str
    chromedriver: str


def in_ci() -> bool:
    """True when the CI environment says so (CI=true, as most CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_browser() -> BrowserBinaries:
    """Chromium and chromedriver, or skip the test (fail it in CI: there it must run)."""
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    if chromium and chromedriver:
        return BrowserBinaries(chromium=chromium, chromedriver=chromedriver)
    missing = " and ".join(
        name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path
    )
    reason = (
        f"{missing} not installed: `apt-get install -y chromium chromium-driver` "
        "(scripts/test installs them)"
    )
    if in_ci():
        pytest.fail(f"CI=true and {reason}; the browser test must run in CI")
    pytest.skip(reason)


class Browser:
    """One WebDriver session: navigate, run a script, take a screenshot."""

    def __init__(self, client: httpx.AsyncClient, session: str) -> None:
        self._client = client
        self._session = session

    async def _command(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        answer = await self._client.request(method, f"/session/{self._session}{path}", json=body)
        payload = answer.json()
        if answer.status_code != 200:
            raise AssertionError(f"webdriver {method} {path}: {payload.get('value')}")
        return payload["value"]

    async def get(self, url: str) -> None:
        """Load `url` (returns once the document has loaded)."""
        await self._command("POST", "/url", {"url": url})

    async def run(self, script: str, *args: Any) -> Any:
        """Run `script` as a function body in the page; return what it returns (JSON)."""
        return await self._command("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def set_window(self, width: int, height: int) -> None:
        """Resize the window (headless: the viewport) to `width` x `height` CSS pixels."""
        await self._command("POST", "/window/rect", {"width": width, "height": height})

    async def screenshot(self, path: Path) -> None:
        """Save the viewport as a PNG."""
        encoded = await self._command("GET", "/screenshot")
        await asyncio.to_thread(_write, path, base64.b64decode(encoded))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _log_file(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


@contextlib.asynccontextmanager
async def chromium(binaries: BrowserBinaries, workdir: Path) -> AsyncIterator[Browser]:
    """chromedriver on a port the OS picks, and a headless Chromium session through it."""
    log_path = workdir / "chromedriver.log"
    # Output to a file, not a pipe: a pipe nobody reads could fill up and stall the driver.
    with _log_file(log_path) as log:
        driver = await asyncio.create_subprocess_exec(
            binaries.chromedriver,
            "--port=0",
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        port = 0

        def started() -> bool:
            nonlocal port
            if driver.returncode is not None:
                raise AssertionError(f"chromedriver exited: {log_path.read_text(errors='replace')}")
            found = PORT_LINE.search(log_path.read_bytes())
            port = int(found.group(1)) if found else 0
            return port > 0

        await wait_for(started, timeout=START_TIMEOUT, interval=0.05, message="chromedriver")
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=COMMAND_TIMEOUT
        ) as client:
            options = {
                "binary": binaries.chromium,
                "args": [*CHROMIUM_ARGS, f"--user-data-dir={workdir / 'profile'}"],
            }
            answer = await client.post(
                "/session",
                json={
                    "capabilities": {
                        "alwaysMatch": {
                            "browserName": "chrome",
                            "goog:chromeOptions": options,
                            "timeouts": {"pageLoad": int(COMMAND_TIMEOUT * 1000)},
                        }
                    }
                },
            )
            if answer.status_code != 200:
                raise AssertionError(f"could not start Chromium: {answer.text}")
            session = answer.json()["value"]["sessionId"]
            try:
                yield Browser(client, session)
            finally:
                await client.delete(f"/session/{session}")
    finally:
        if driver.returncode is None:
            driver.terminate()  # chromedriver ends the browsers it started
            try:
                await asyncio.wait_for(driver.wait(), timeout=10)
            except TimeoutError:
                driver.kill()
                await driver.wait()
