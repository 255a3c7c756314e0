"""A real `redis-server` process on a free loopback port, for tests that stop or kill it.

It never touches the Redis that may run on 127.0.0.1:6379: every server here has its own port,
no persistence and its own working directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.helpers import free_port

# The registry timeout of tests that are not about failures: generous, so that a loaded machine
# never turns a slow answer into a failure. The fault tests set their own short timeouts.
TEST_REDIS_TIMEOUT = 5.0
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Attempts at finding a free port: another process can take the one the OS handed out.
START_ATTEMPTS = 5


class RedisServerError(RuntimeError):
    """The redis-server binary is missing or the server did not come up."""


class RedisServer:
    """One redis-server process; `start()` again after `stop()`/`kill()` reuses the port, empty."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server is not on PATH; the registry tests need a real Redis "
                "(apt-get install redis-server, or run scripts/test, which installs it)"
            )
        self._binary = binary
        self._workdir = workdir
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the process is alive (it may be paused)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers PING; the first start picks the port."""
        if self.running:
            return
        if self.port:
            if self._launch():
                return
        else:
            for _ in range(START_ATTEMPTS):
                self.port = free_port()
                if self._launch():
                    return
        raise RedisServerError(f"redis-server did not start on port {self.port}; {self._log()}")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        self.resume()  # a paused process cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything cleanly."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung server."""
        if self._process is not None and self.running:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self._process is not None and self.running:
            os.kill(self._process.pid, signal.SIGCONT)

    def command(self, *args: str, timeout: float = 5.0) -> bytes:
        """Send one command over a fresh socket and return the first reply line."""
        encoded = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(arg.encode())}\r\n".encode() + arg.encode() + b"\r\n" for arg in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(encoded)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.strip()

    def flushall(self) -> None:
        """Empty every database of this server (and only this server)."""
        reply = self.command("FLUSHALL")
        if reply != b"+OK":
            raise RedisServerError(f"FLUSHALL on port {self.port} answered {reply!r}")

    def arguments(self) -> list[str]:
        """The command line after the binary; subclasses add cluster or Sentinel options."""
        return [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._workdir),
            "--daemonize",
            "no",
        ]

    @property
    def workdir(self) -> Path:
        """The server's own directory (log, cluster or Sentinel config)."""
        return self._workdir

    def _launch(self) -> bool:
        log = (self._workdir / "redis.log").open("ab")
        with log:
            self._process = subprocess.Popen(
                [self._binary, *self.arguments()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self._wait_ready()

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.running:
                return False  # exited: most likely the port was taken
            with contextlib.suppress(OSError):
                if self.command("PING", timeout=0.5) == b"+PONG":
                    return True
            time.sleep(0.02)  # polling interval of a deadline wait, not synchronisation
        self.kill()
        return False

    def _log(self) -> str:
        path = self._workdir / "redis.log"
        tail = path.read_text(errors="replace").splitlines()[-5:] if path.exists() else []
        return "log tail: " + (" | ".join(tail) or "(empty)")
