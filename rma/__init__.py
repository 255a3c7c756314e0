"""The composition package: the `rma` command and the demo, the only code that imports all of
`dht_bridge`, `edge_router` and `worker` (which import downwards only: the router and the
worker use `dht_bridge`, nothing else crosses).

- `cli`       the `rma` dispatcher: one parser, one subcommand per process.
- `commands/` one module per subcommand (node, bridge, router, worker, demo, flush), each
  with `configure(parser)` and `run(args) -> int`.
- `process`   running a service until SIGTERM or SIGINT, then stopping it cleanly.
- `demo`      everything on loopback in one process, with no Redis.
"""

from __future__ import annotations
