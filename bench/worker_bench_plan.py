"""The plan of a worker_bench run, shared by the parent and its children: the real intervals,
the services, each worker's configuration with its intervals divided by the scale, and how the
workers are dealt to the child processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dht_bridge.backoff import ExponentialBackoff
from dht_bridge.settings import DHTSettings
from worker.config import DEFAULT_REACH_INTERVAL, WorkerConfig, worker_dht_settings

__all__ = [
    "JOIN_PARALLEL",
    "REAL_HEARTBEAT",
    "REAL_TTL",
    "SERVICES",
    "STREAM_LIMIT",
    "agent_config",
    "dht_settings",
    "shares",
]

REAL_HEARTBEAT = 30.0
REAL_TTL = 90.0
SERVICES = ("ocr", "gpu", "asr", "tts")
JOIN_PARALLEL = 4
# The JSON lines between the parent and a child carry per-agent lists: thousands of agents.
STREAM_LIMIT = 1 << 24


def dht_settings(scale: float, *, worker: bool, holder_cache: float | None = None) -> DHTSettings:
    """Loopback DHT settings (the worker's or the core's defaults, `holder_cache` real seconds
    when given) with the periodic intervals scaled down."""
    base = worker_dht_settings() if worker else DHTSettings()
    if holder_cache is not None:
        base = replace(base, holder_cache_ttl=holder_cache)
    return replace(
        base,
        host="127.0.0.1",
        port=0,
        refresh_interval=base.refresh_interval / scale,
        holder_cache_ttl=base.holder_cache_ttl / scale,
    )


def agent_config(
    workdir: Path,
    index: int,
    edge_url: str,
    scale: float,
    *,
    edge_only: bool,
    holder_cache: float | None = None,
    services: int = len(SERVICES),
) -> WorkerConfig:
    """Worker `index`: one of the first `services` services, a trycloudflare URL, every
    interval divided by `scale`."""
    return WorkerConfig(
        services=(SERVICES[index % services],),
        tunnel_url=f"https://bench-{index}.trycloudflare.com",
        state_file=workdir / f"w{index}" / "state.json",
        edge_url=edge_url,
        dht=dht_settings(scale, worker=True, holder_cache=holder_cache),
        heartbeat=REAL_HEARTBEAT / scale,
        ttl=REAL_TTL / scale,
        # Today's coordinator heartbeat: every 30 s through the edge (the baseline).
        fallback_heartbeat=REAL_HEARTBEAT / scale,
        fallback_ttl=REAL_TTL / scale,
        retry=ExponentialBackoff(base=5.0 / scale, cap=300.0 / scale),
        reach_interval=DEFAULT_REACH_INTERVAL / scale,
        edge_only=edge_only,
    )


def shares(workers: int, procs: int) -> list[int]:
    """How many workers each child process runs (`procs` at most, none empty)."""
    procs = max(1, min(procs, workers))
    return [workers // procs + (1 if i < workers % procs else 0) for i in range(procs)]
