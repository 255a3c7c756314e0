"""A virtual clock for the emulated network: an event loop whose time jumps to the next timer
whenever nothing is ready to run, so hours of a network's life pass in minutes of CPU.

Datagrams on `EmulatedNetwork` are `call_later` timers, so the whole network is a discrete-event
simulation under this loop: callbacks take no virtual time, and the clock moves only from one
scheduled event to the next. Work that finishes outside the loop (a thread, a real socket) is
still polled before every jump, and waited for in real time when no timer is left.

`virtual_time(loop)` makes `time.monotonic()` and `time.time()` read the loop's clock, for
code that reads the clock through the `time` module (our DHT node, the `kademlia` library) rather
than through the loop; a clock bound earlier as a default argument (`clock=time.time`) is not
reached that way and must be injected. `run_virtual(main)` runs a coroutine with both.

`DilatedClockLoop(factor)` is the other way past what one loop holds in real time: real time
slowed `factor` times (time dilation, as in Gupta et al., "To Infinity and Beyond: Time-Warped
Network Emulation", NSDI 2006). Its clock runs `factor` times slower than the real one, so every
timer, datagram delay and lease lasts `factor` times longer in real seconds while callbacks
cost what they cost: the loop has `factor` times the CPU per second of the run, and its
lateness, read on its own clock, is `factor` times smaller. Unlike the virtual clock it keeps
real concurrency (callbacks take time, timers race the work in front of them), so it serves as
the real-time reference at sizes one core cannot carry undilated. `run_dilated(main, factor)`.

Why not the `looptime` package: it steps the clock only after at least one (by default 42)
idle passes of the loop, which is right for tests that mix timers with real I/O but makes every
emulated datagram, each its own timer, cost 3 to 60 times what a jump costs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import time
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol, TypeVar

__all__ = [
    "ClockedLoop",
    "DilatedClockLoop",
    "VirtualClockLoop",
    "run_dilated",
    "run_virtual",
    "virtual_time",
]

T = TypeVar("T")


class _SkippingSelector(selectors.DefaultSelector):
    """Polls for I/O without waiting; when there is none, moves the loop's clock by the wait."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            # No timer left: only another thread (or a real socket) can wake the loop.
            return super().select(None)
        self._loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock: `time()` starts at `start` (default: the real
    monotonic clock's value) and jumps to the next timer when nothing is ready; `wall()` is
    the matching unix time, from `wall_start` (default: now)."""

    def __init__(self, *, start: float | None = None, wall_start: float | None = None) -> None:
        self._now = time.monotonic() if start is None else start
        self._wall_offset = (time.time() if wall_start is None else wall_start) - self._now
        super().__init__(_SkippingSelector(self))

    def time(self) -> float:
        """The virtual monotonic clock, in seconds."""
        return self._now

    def wall(self) -> float:
        """The virtual unix time, in seconds."""
        return self._wall_offset + self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by `seconds` (the loop does this itself when idle)."""
        if seconds > 0:
            self._now += seconds


class _DilatedSelector(selectors.DefaultSelector):
    """Waits `factor` times as long as asked: the loop asks in seconds of its own clock."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self._factor = factor

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            timeout *= self._factor
        return super().select(timeout)


class DilatedClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on real time slowed `factor` (>= 1) times: `time()` starts at `start`
    (default: the real monotonic clock's value) and then moves one second for every `factor`
    real seconds; `wall()` is the matching unix time, from `wall_start` (default: now)."""

    def __init__(
        self, factor: float, *, start: float | None = None, wall_start: float | None = None
    ) -> None:
        self._factor = factor
        # Bound now: `virtual_time` points the module's functions at this loop's clock.
        self._real = time.monotonic
        self._real_start = self._real()
        self._start = self._real_start if start is None else start
        self._wall_offset = (time.time() if wall_start is None else wall_start) - self._start
        super().__init__(_DilatedSelector(factor))
        if factor < 1:
            self.close()  # a loop left half-made would complain when collected
            raise ValueError(f"a dilation factor is at least 1, not {factor}")

    def time(self) -> float:
        """The dilated monotonic clock, in seconds."""
        return self._start + (self._real() - self._real_start) / self._factor

    def wall(self) -> float:
        """The dilated unix time, in seconds."""
        return self._wall_offset + self.time()


class ClockedLoop(Protocol):
    """A loop with a clock of its own: monotonic `time()` and unix `wall()`."""

    def time(self) -> float:
        """Monotonic seconds."""
        ...

    def wall(self) -> float:
        """Unix seconds."""
        ...


@contextlib.contextmanager
def virtual_time(loop: ClockedLoop) -> Iterator[None]:
    """While open, `time.monotonic()` and `time.time()` read `loop`'s clock."""
    saved = time.monotonic, time.time
    time.monotonic, time.time = loop.time, loop.wall
    try:
        yield
    finally:
        time.monotonic, time.time = saved


def run_virtual(main: Coroutine[Any, Any, T], *, start: float | None = None) -> T:
    """`asyncio.run(main)` on a `VirtualClockLoop`, with the `time` module on its clock."""
    return _run_on(VirtualClockLoop(start=start), main)


def run_dilated(main: Coroutine[Any, Any, T], *, factor: float) -> T:
    """`asyncio.run(main)` on a `DilatedClockLoop`, with the `time` module on its clock."""
    return _run_on(DilatedClockLoop(factor), main)


def _run_on(loop: VirtualClockLoop | DilatedClockLoop, main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=lambda: loop) as runner, virtual_time(loop):
        return runner.run(main)
