"""The way to the workers: `/route/{service}/...` forwarded through their tunnels.

- `proxy`   choosing a provider (the less loaded of two healthy ones), forwarding and
            streaming, retries of safe requests, ejection of failing providers.
- `proof`   tunnel proofs: a provider is routed once its URL answered for its key.
- `pool`    kept-alive connections per tunnel origin, bounded in all and per origin, O(1) a
            request.
- `http11`  the lean HTTP/1.1 connection each of them is, with a strict parser of answers.
"""

from __future__ import annotations

from edge_router.upstream.pool import TunnelTransport
from edge_router.upstream.proof import ProofSettings, TunnelProver, prover_of
from edge_router.upstream.proxy import Proxy, ProxySettings, upstream_client

__all__ = [
    "ProofSettings",
    "Proxy",
    "ProxySettings",
    "TunnelProver",
    "TunnelTransport",
    "prover_of",
    "upstream_client",
]
