"""A stand-in for `cloudflared tunnel --url URL` in tests (the real binary is neither in
Debian nor on PyPI). It prints what cloudflared prints for a quick tunnel, the lines of
`RunQuickTunnel` and `AsciiBox` in cloudflared's cmd/cloudflared/tunnel/quick_tunnel.go, in
its zerolog console format on standard error, and then relays TCP from a new loopback port to
the service, as the tunnel carries HTTP to it. Its "quick tunnel URL" is that port's
http://127.0.0.1 URL (the tests admit loopback tunnels), so every start gets another URL.

Run as `python cloudflared_standin.py tunnel [--no-autoupdate] --url http://127.0.0.1:PORT`;
`--fail` makes it exit with cloudflared's error line instead, for the failure paths.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from urllib.parse import urlsplit

DISCLAIMER = (
    "Thank you for trying Cloudflare Tunnel. Doing so, without a Cloudflare account, is a "
    "quick way to experiment and try it out."
)


def log(level: str, message: str) -> None:
    """One line as cloudflared's console logger writes it."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} {level} {message}", file=sys.stderr, flush=True)


def ascii_box(lines: list[str], padding: int = 2) -> list[str]:
    """cloudflared's AsciiBox."""
    width = max(len(line) for line in lines)
    border = "+" + "-" * (width + padding * 2) + "+"
    spacer = " " * padding
    return [border, *(f"|{spacer}{line.ljust(width)}{spacer}|" for line in lines), border]


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until it closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--url", required=True)
    parser.add_argument("--no-autoupdate", action="store_true")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    log("INF", DISCLAIMER)
    log("INF", "Requesting new quick Tunnel on trycloudflare.com...")
    if args.fail:
        log("ERR", 'failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel"')
        return 1
    target = urlsplit(args.url)

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    box = ascii_box(
        [
            "Your quick Tunnel has been created! Visit it at (it may take some time to be "
            "reachable):",
            url,
        ]
    )
    for line in box:
        log("INF", line)
    log("INF", "Registered tunnel connection connIndex=0 event=0 ip=127.0.0.1 protocol=quic")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    log("INF", "Initiating graceful shutdown due to signal terminated ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
