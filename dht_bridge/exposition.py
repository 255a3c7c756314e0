"""Prometheus exposition of figures read at scrape time, through prometheus_client.

A process keeps plain counters where it works (no cost on a hot path) and hands the collector a
function returning a snapshot; the collector types each figure from a table (name, kind, help).
Counter names end in `_total` in the table, as exposed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["FiguresCollector", "MetricTable", "process_registry"]

# name -> (kind: "counter" or "gauge", help)
MetricTable = Mapping[str, tuple[str, str]]


class FiguresCollector(Collector):
    """Exposes `figures()` at each scrape, typed by `table` (unknown names are gauges)."""

    def __init__(self, figures: Callable[[], Mapping[str, float]], table: MetricTable) -> None:
        self._figures = figures
        self._table = table

    def collect(self) -> Iterator[Metric]:
        """One metric family per figure."""
        for name, value in sorted(self._figures().items()):
            kind, text = self._table.get(name, ("gauge", name.replace("_", " ")))
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), text, value=value)
            else:
                yield GaugeMetricFamily(name, text, value=value)


def process_registry() -> CollectorRegistry:
    """A registry of this process's own (not the library's global one), with CPU, memory and
    file-descriptor figures: tests and several servers in one process stay apart."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry
