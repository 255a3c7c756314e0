"""The worker agent's errors: a small tree under `dht_bridge.errors.RMAError`."""

from __future__ import annotations

from dht_bridge.errors import RMAError

__all__ = [
    "EdgeError",
    "EdgeRefused",
    "EdgeUnavailable",
    "StartError",
    "StateInUse",
    "TunnelError",
    "WorkerError",
]


class WorkerError(RMAError):
    """Base of the agent's own errors."""


class StartError(WorkerError):
    """The agent could not start: its socket, its state file, or nowhere to join."""


class StateInUse(StartError):
    """Another agent runs on the same state file: two agents would be one worker twice."""


class TunnelError(StartError):
    """cloudflared could not be run, or gave no quick-tunnel URL."""


class EdgeError(WorkerError):
    """The edge did not do what was asked."""


class EdgeUnavailable(EdgeError):
    """The edge could not be reached, or answered with a server error: worth retrying later."""


class EdgeRefused(EdgeError):
    """The edge refused the request (4xx): retrying the same request will not help."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"edge answered {status}: {detail}")
        self.status = status
