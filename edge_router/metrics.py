"""The router's metrics: requests by class and status, latency histograms, today's edge budget,
and the operator's figures, exposed through prometheus_client.

Counting stays cheap on the hot path (a dict increment and one histogram observation); the
figures are read at scrape time (`dht_bridge.exposition`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

from prometheus_client import Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dht_bridge.bridge.metrics import METRICS as BRIDGE_METRICS
from dht_bridge.exposition import FiguresCollector, MetricTable, process_registry

__all__ = [
    "FIGURES",
    "OPERATOR_CLASSES",
    "REQUEST_CLASSES",
    "ROUTED_SERVICE",
    "Metrics",
    "request_class",
    "route_label",
]

REQUEST_CLASSES = ("bootstrap", "lookup", "register", "route", "admin", "topology", "health")
OPERATOR_CLASSES = frozenset({"health", "topology"})
# Latency buckets from a cache hit (tens of µs) to a slow routed request (a minute).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Distinct services given their own latency series; past it they share "other", so that
# workers registering ever new service names cannot grow the exposition without bound.
MAX_SERVICE_LABELS = 256
# The request state key (scope["state"]) under which the route handler names a service it found
# providers of: only such a service gets a latency series of its own.
ROUTED_SERVICE = "rma_routed_service"
SECONDS_A_DAY = 86_400.0  # a UTC day (POSIX time has no leap seconds)

# The operator's figures (`handlers.figures`, prefixed rma_): counters typed as such.
FIGURES: MetricTable = {
    "rma_cache_entries": ("gauge", "Lookups held in this router's cache."),
    "rma_cache_hits_total": ("counter", "Lookups answered fresh from the cache."),
    "rma_cache_misses_total": ("counter", "Lookups that read a backend."),
    "rma_cache_stale_total": ("counter", "Lookups answered stale while backends failed."),
    "rma_cache_hit_ratio": ("gauge", "Hits over all lookups since start."),
    "rma_backend_reads_total": ("counter", "Backend reads (concurrent misses share one)."),
    "rma_registry_failures_total": ("counter", "Lookups the registry could not answer."),
    "rma_dht_reads_total": ("counter", "Lookups answered from the DHT."),
    "rma_dht_reads_refused_total": (
        "counter",
        "Lookups not sent to the DHT: over its read budget (edge_router.providers.DHT_READS).",
    ),
    "rma_edge_requests_today": ("gauge", "Requests since 00:00 UTC, operator pages excluded."),
    "rma_edge_daily_budget": ("gauge", "Edge requests a day the plan allows."),
    "rma_events_received_total": ("counter", "Change events heard on rma:events."),
    "rma_events_connected": ("gauge", "1 while subscribed to rma:events."),
    "rma_requests_refused_total": (
        "counter",
        "Requests the server refused before the app: malformed, head too large, or slow.",
    ),
    "rma_dht_servers": ("gauge", "Live workers in DHT server mode (from the registry)."),
    "rma_dht_clients": ("gauge", "Live workers in DHT client mode (from the registry)."),
    "rma_topology_truncated": ("gauge", "1 when the registry holds more than was read."),
    "rma_rate_limited_total": ("counter", "Requests refused with 429 by the rate limits."),
    "rma_rate_limit_storage_failures_total": (
        "counter",
        "Calls to the shared rate-limit storage (Redis) that failed; the limits fell open.",
    ),
    # An in-process bridge's (the demo's).
    **BRIDGE_METRICS,
}


# Exposed by the requests collector itself; left out of the figures to keep one series each.
_OWN = frozenset({"rma_edge_requests_today", "rma_edge_daily_budget"})


def request_class(path: str) -> str:
    """The budget class of a request path."""
    if path.startswith("/dht/bootstrap"):
        return "bootstrap"
    if path.startswith("/services"):
        return "lookup"
    if path.startswith("/workers"):
        return "register"
    if path.startswith("/route/"):
        return "route"
    if path.startswith("/admin/"):
        return "admin"
    if path in ("/topology", "/") or path.startswith("/static/"):
        return "topology"
    if path in ("/healthz", "/livez", "/readyz", "/metrics", "/openapi.json"):
        return "health"
    return "other"


def route_label(klass: str, cache: str | None, routed: str | None) -> str:
    """The latency series of a request: lookups by hit or miss, routes by service.

    A route has its service's series only when the router found providers of it (`routed`,
    see ROUTED_SERVICE; the handler checked the name): a name from the path alone would let
    any client add series at will.
    """
    if klass == "lookup" and cache:
        return f"lookup_{cache.lower()}"
    if klass == "route":
        return f"route:{routed}" if routed else "route:other"
    return klass


class Metrics:
    """Counts requests by class and status, times them, and keeps today's edge requests."""

    def __init__(self, *, daily_budget: int, clock: Callable[[], float] = time.time) -> None:
        self.daily_budget = daily_budget
        self._clock = clock
        self.requests: Counter[tuple[str, int]] = Counter()
        # The UTC day last seen, its bounds on `clock` and its name: the name is formatted once
        # a day, not once a request (a strftime cost a cache hit 4% of its CPU).
        self._span: tuple[float, float, str] = (math.inf, -math.inf, "")
        self._day = self._today()
        self.today: Counter[str] = Counter()
        self.registry = process_registry()
        self.registry.register(_RequestsCollector(self))
        self._figures: Mapping[str, float] = {}
        self.registry.register(FiguresCollector(lambda: self._figures, FIGURES))
        self._latency = Histogram(
            "rma_request_duration_seconds",
            "Time to answer, by route class (lookup hit or miss, route per service, ...).",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._upstream = Histogram(
            "rma_upstream_duration_seconds",
            "Time from sending a routed request to a worker to its answer's head, by service.",
            ["service"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._series: dict[tuple[int, str], Histogram] = {}

    def _today(self) -> str:
        now = self._clock()
        start, end, name = self._span
        if start <= now < end:
            return name
        moment = datetime.fromtimestamp(now, UTC)
        midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        name = moment.strftime("%Y-%m-%d")
        self._span = (midnight, midnight + SECONDS_A_DAY, name)
        return name

    def count(self, klass: str, status: int, seconds: float | None = None, route: str = "") -> None:
        """Record one answered request (and how long it took, under `route`)."""
        self.requests[(klass, status)] += 1
        day = self._today()
        if day != self._day:
            self._day, self.today = day, Counter()
        # The operator's own probes and dashboard are not the network's use of the edge: one
        # open topology page alone would add tens of thousands of requests a day.
        if klass not in OPERATOR_CLASSES:
            self.today[klass] += 1
        if seconds is not None:
            self._observe(self._latency, route or klass, seconds)

    def upstream(self, service: str, seconds: float) -> None:
        """Record a worker's answer time for `service`."""
        self._observe(self._upstream, service, seconds)

    def _observe(self, histogram: Histogram, label: str, seconds: float) -> None:
        key = (id(histogram), label)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= MAX_SERVICE_LABELS:
                key, label = (id(histogram), "other"), "other"
                series = self._series.get(key)
            if series is None:
                series = histogram.labels(label)
                self._series[key] = series
        series.observe(seconds)

    @property
    def edge_requests_today(self) -> int:
        """Requests today (UTC) in every class but the operator's probes and pages."""
        return sum(self.today.values())

    def expose(self, figures: Mapping[str, float]) -> bytes:
        """The Prometheus exposition: requests, histograms, process, and `figures` (rma_*)."""
        self._figures = {k: v for k, v in figures.items() if k not in _OWN}
        return generate_latest(self.registry)


class _RequestsCollector(Collector):
    """`rma_requests_total{class,status}` from the plain counter the hot path increments."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        """The request counter, and today's edge figures."""
        family = CounterMetricFamily(
            "rma_requests", "Requests answered, by class and status.", labels=["class", "status"]
        )
        for (klass, status), value in sorted(self._metrics.requests.items()):
            family.add_metric([klass, str(status)], value)
        yield family
        yield GaugeMetricFamily(
            "rma_edge_requests_today",
            "Requests since 00:00 UTC, operator pages excluded.",
            value=self._metrics.edge_requests_today,
        )
        yield GaugeMetricFamily(
            "rma_edge_daily_budget",
            "Edge requests a day the plan allows.",
            value=self._metrics.daily_budget,
        )
