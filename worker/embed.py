"""The agent for programs that are not async: its own event loop in a background thread.

    with BackgroundAgent(WorkerConfig(...)) as agent:
        agent.update(load=0.4)
        providers = agent.discover("gpu").providers

Every call blocks until the agent's loop has done it, and raises what the agent raised.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from dht_bridge.records import CapabilityValue
from worker.agent import Mode, WorkerAgent
from worker.config import WorkerConfig
from worker.discovery import Discovery
from worker.errors import StartError

__all__ = ["BackgroundAgent"]

T = TypeVar("T")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class BackgroundAgent:
    """A `WorkerAgent` running in a daemon thread; `start()`/`stop()` or a `with` block.

    Keyword arguments go to `WorkerAgent` (a load source, say). Once stopped, or after a failed
    start, it can be started again (each run with a new agent).
    """

    def __init__(self, config: WorkerConfig, **agent_kwargs: Any) -> None:
        self.config = config
        self._kwargs = agent_kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._agent: WorkerAgent | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> BackgroundAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def agent(self) -> WorkerAgent:
        """The agent itself; read its attributes only (it lives on another thread)."""
        if self._agent is None:
            raise StartError("the background agent has not started")
        return self._agent

    @property
    def worker_id(self) -> str:
        """This worker's id."""
        return self.agent.worker_id

    @property
    def mode(self) -> Mode:
        """Where the record lives now."""
        return self.agent.mode

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the agent (join, first publish) and return once it has started."""
        if self._thread is not None and self._thread.is_alive():
            raise StartError("the background agent is running already")
        self._thread = threading.Thread(target=self._run, name="rma-worker-agent", daemon=True)
        self._started.clear()  # this run's start, not the last one's
        self._thread.start()
        if not self._started.wait(timeout):
            raise StartError(f"the agent did not start within {timeout:g} s")
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Leave (tombstone) and stop the thread; a no-op when not running."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is None or stop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)

    def update(
        self,
        *,
        services: Sequence[str] | None = None,
        capabilities: Mapping[str, CapabilityValue] | None = None,
        load: float | None = None,
    ) -> None:
        """`WorkerAgent.update`, from this thread."""
        self._call(self.agent.update(services=services, capabilities=capabilities, load=load))

    def discover(self, service: str, limit: int = 10) -> Discovery:
        """`WorkerAgent.discover`, from this thread."""
        return self._call(self.agent.discover(service, limit))

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT) -> T:
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("no loop")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # never started, stopped, or closing its loop just now
            coro.close()
            raise StartError("the background agent is not running") from None
        return future.result(timeout)

    def _run(self) -> None:
        self._failure = None
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            agent = WorkerAgent(self.config, **self._kwargs)
            self._agent = agent
            try:
                await agent.start()
            except BaseException as exc:
                self._failure = exc
                return
            finally:
                self._started.set()
            try:
                await self._stop.wait()
            finally:
                await agent.aclose()
        finally:
            # Before asyncio.run closes the loop: a later call says "not running", not
            # "Event loop is closed".
            self._loop = None
