"""The worker agent a volunteer runs, or embeds in their own service.

- `config`    `WorkerConfig` (frozen) and `WORKER_OPTIONS`, the `rma worker` options.
- `agent`     `WorkerAgent`: join once through the edge, heartbeat over the DHT, fall back to
              the edge when the DHT is out of reach, leave with a tombstone.
- `discovery` finding peers by service: the DHT first, the edge's `/services` on a deadline.
- `edge`      the edge router's client: bootstrap peers, registration, lookups.
- `embed`     `BackgroundAgent`: the agent in a thread, for programs that are not async.
- `load`      where the load in the record comes from: fixed, counted in flight (with an ASGI
              middleware), or polled.
- `proof`     the tunnel proof's answer: `ProofMiddleware` for a service that embeds the agent,
              `ProofProxy` in front of the service for `--cloudflared`.
- `state`     the JSON state file (key path, seq, saved peers) and its lock.
- `cloudflared` a quick tunnel for `--cloudflared`; `proof` answers tunnel proofs.
- `errors`    `WorkerError` and its subclasses.
"""

from __future__ import annotations

from worker.agent import WorkerAgent
from worker.config import WORKER_OPTIONS, WorkerConfig
from worker.discovery import Discovery, discover
from worker.embed import BackgroundAgent
from worker.errors import EdgeError, EdgeRefused, EdgeUnavailable, StartError, WorkerError
from worker.load import HttpLoad, InFlightCounter, InFlightMiddleware, LoadSource, StaticLoad
from worker.proof import ProofMiddleware, ProofProxy

__all__ = [
    "WORKER_OPTIONS",
    "BackgroundAgent",
    "Discovery",
    "EdgeError",
    "EdgeRefused",
    "EdgeUnavailable",
    "HttpLoad",
    "InFlightCounter",
    "InFlightMiddleware",
    "LoadSource",
    "ProofMiddleware",
    "ProofProxy",
    "StartError",
    "StaticLoad",
    "WorkerAgent",
    "WorkerConfig",
    "WorkerError",
    "discover",
]
