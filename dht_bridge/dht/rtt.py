"""How long this node's requests take to be answered, and so when a silent contact is a dead one.

A lookup stops counting a request against its alpha slots once it has gone unanswered for a
"stall" time. A fixed stall is either too short for a slow network (live contacts taken for
dead: extra requests) or too long for a fast one (each dead contact costs the lookup that long).
The estimator follows TCP's retransmission timer (RFC 6298): a smoothed round trip plus four
times its mean deviation, kept between a floor and the configured ceiling.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# RFC 6298's gains: the smoothed RTT moves 1/8 of the way to each sample, its deviation 1/4.
SRTT_GAIN = 0.125
RTTVAR_GAIN = 0.25
DEVIATIONS = 4.0


class RoundTrips:
    """A smoothed round-trip time and its deviation, from the replies this node received."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0

    def observe(self, seconds: float) -> None:
        """Take in one request's time from send to reply (event-loop delays included)."""
        if seconds < 0:
            return
        self.samples += 1
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
            return
        self.rttvar += RTTVAR_GAIN * (abs(self.srtt - seconds) - self.rttvar)
        self.srtt += SRTT_GAIN * (seconds - self.srtt)

    def stall(self, floor: float, ceiling: float) -> float:
        """How long a silent request may hold a lookup slot: `ceiling` until replies have
        been seen, then the smoothed RTT plus 4 deviations, within [floor, ceiling]."""
        if self.srtt is None:
            return ceiling
        return min(ceiling, max(floor, self.srtt + DEVIATIONS * self.rttvar))
