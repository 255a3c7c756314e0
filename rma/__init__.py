"""The composition package: the `rma` command and the demo, the only code that imports all of
`dht_bridge`, `edge_router` and `worker` (which import downwards only: the router and the
worker use `dht_bridge`, nothing else crosses).

- `cli`       the `rma` dispatcher: one parser, one subcommand per process.
- `commands/` one module per subcommand (node, bridge, router, worker, demo, flush, lookup),
  each with `configure(parser)` and `run(args) -> int`.
- `process`   running a service until SIGTERM or SIGINT, then stopping it cleanly.
- `exits`     the exit codes every subcommand returns; `logs` the log handler and its options.
- `client`    what the client subcommands (flush, lookup) share: one request to a router.
- `demo`      everything on loopback in one process, with no Redis.
- `reference` docs/configuration.md's table, generated from every option table.
"""

from __future__ import annotations
