"""Per-replica sliding-window counters: the rate limits the router keeps in its own memory.

The same sliding-window-counter strategy as `limits` (a fixed window's count, plus the previous
window's weighted by how much of it still overlaps), with rates given as `limits` items. Not
`limits`' own memory storage: that one rescans every key on each turn of the event loop after a
hit (measured with 20,000 clients: 1.7 ms per request; 100,000: 16 ms), which a flood from many
addresses turns into a denial of service. Here a hit is O(1), entries live in a bounded
`cachetools.TTLCache` that expires them as it goes, and the clock is injected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachetools import TTLCache
from limits import RateLimitItem

__all__ = ["DEFAULT_MAX_KEYS", "LocalWindows"]

# Clients (per class and rate) counted at once. Beyond, the least recently seen are forgotten:
# memory stays bounded under a flood from many addresses, at the price of that flood's oldest
# counts (about 200 bytes each).
DEFAULT_MAX_KEYS = 65536


@dataclass
class _Window:
    index: int  # which fixed window `current` counts (clock // length)
    previous: int
    current: int


class LocalWindows:
    """Sliding-window counters in this process, keyed by any hashable names; O(1) a hit."""

    def __init__(
        self,
        *,
        longest: float,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        # A window counts until the next one has passed too: two lengths of the longest rate.
        self._windows: TTLCache[tuple[object, ...], _Window] = TTLCache(
            max_keys, 2 * longest, timer=clock
        )

    def hit(self, items: Sequence[RateLimitItem], *key: object) -> int | None:
        """Count one request of `key` against each rate: None when every rate takes it, else
        the seconds until the first one that refused would take one more (for Retry-After)."""
        now = self._clock()
        counted: list[tuple[tuple[object, ...], _Window]] = []
        for number, item in enumerate(items):
            name = (number, *key)
            length = item.get_expiry()
            index = math.floor(now / length)
            window = self._windows.get(name)
            if window is None or window.index < index - 1:
                window = _Window(index, 0, 0)
            elif window.index == index - 1:
                window = _Window(index, window.current, 0)
            elapsed = now - index * length
            weighted = window.previous * (1 - elapsed / length) + window.current
            if math.floor(weighted) + 1 > item.amount:
                self._windows[name] = window
                return max(1, math.ceil(_wait(window, item.amount, length, elapsed)))
            counted.append((name, window))
        # Counted only once every rate took it, as `limits` does with several rates.
        for name, window in counted:
            window.current += 1
            self._windows[name] = window
        return None

    def __len__(self) -> int:
        """Counters held now (a client has one per rate of its class)."""
        return len(self._windows)


def _wait(window: _Window, limit: int, length: float, elapsed: float) -> float:
    """Seconds from now until a hit is taken: `previous * (1 - t / length) + current < limit`."""
    room = limit - window.current
    if room > 0 and window.previous > 0:
        return max(length * (1 - room / window.previous) - elapsed, 0.0)
    # This window alone is full: in the next one its count is the previous one's.
    rest = length - elapsed
    if window.current <= limit:
        return rest
    return rest + length * (1 - limit / window.current)
