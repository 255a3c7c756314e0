"""Request counters per class and the Prometheus text exposition of /metrics."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

REQUEST_CLASSES = ("bootstrap", "lookup", "register", "route", "admin", "topology", "health")
OPERATOR_CLASSES = frozenset({"health", "topology"})


def request_class(path: str) -> str:
    """The budget class of a request path."""
    if path.startswith("/dht/bootstrap"):
        return "bootstrap"
    if path.startswith("/services/"):
        return "lookup"
    if path.startswith("/workers"):
        return "register"
    if path.startswith("/route/"):
        return "route"
    if path.startswith("/admin/"):
        return "admin"
    if path in ("/topology", "/") or path.startswith("/static/"):
        return "topology"
    if path in ("/healthz", "/metrics"):
        return "health"
    return "other"


class Metrics:
    """Counts requests by class and status, and today's edge requests against the daily budget."""

    def __init__(self, *, daily_budget: int, clock: Callable[[], float] = time.time) -> None:
        self.daily_budget = daily_budget
        self._clock = clock
        self.requests: Counter[tuple[str, int]] = Counter()
        self._day = self._today()
        self.today: Counter[str] = Counter()

    def _today(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%d")

    def count(self, klass: str, status: int) -> None:
        """Record one answered request."""
        self.requests[(klass, status)] += 1
        day = self._today()
        if day != self._day:
            self._day, self.today = day, Counter()
        # The operator's own probes and dashboard are not the network's use of the edge: one
        # open topology page alone would add tens of thousands of requests a day.
        if klass not in OPERATOR_CLASSES:
            self.today[klass] += 1

    @property
    def edge_requests_today(self) -> int:
        """Requests today (UTC) in every class but the operator's probes and pages."""
        return sum(self.today.values())

    def render(self, gauges: Mapping[str, float]) -> str:
        """Prometheus text format: request counters plus the given gauges (name -> value)."""
        lines = [
            "# HELP rma_requests_total Requests answered, by class and status.",
            "# TYPE rma_requests_total counter",
        ]
        for (klass, status), value in sorted(self.requests.items()):
            lines.append(f'rma_requests_total{{class="{klass}",status="{status}"}} {value}')
        lines += [
            "# HELP rma_edge_requests_today Requests since 00:00 UTC, operator pages excluded.",
            "# TYPE rma_edge_requests_today gauge",
            f"rma_edge_requests_today {self.edge_requests_today}",
            "# TYPE rma_edge_daily_budget gauge",
            f"rma_edge_daily_budget {self.daily_budget}",
        ]
        for name, gauge in sorted(gauges.items()):
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {gauge:g}")
        return "\n".join(lines) + "\n"
