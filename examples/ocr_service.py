"""An example service that embeds the worker agent: a small Starlette app whose lifespan runs
the agent, so starting the service joins the network and stopping it leaves.

The "OCR" is a stand-in (it reports what it was sent); the embedding is the point:

- the agent starts and leaves with the app (`async with WorkerAgent(...)` in the lifespan);
- the load in the record is the requests in flight, counted by `InFlightMiddleware`;
- `ProofMiddleware` answers the router's tunnel proof (`/.well-known/rma-proof`) with the
  agent's key, so a router that requires proved tunnels routes here;
- `POST /admin/services` changes what the worker offers while it runs (`agent.update`).

Run it next to `rma demo` (the demo admits loopback tunnel URLs):

    RMA_SERVICES=ocr RMA_TUNNEL_URL=http://127.0.0.1:9100 RMA_EDGE_URL=http://127.0.0.1:8080 \\
    RMA_TUNNEL_ALLOW_LOOPBACK=1 RMA_STATE_FILE=/tmp/ocr-example.json \\
    python examples/ocr_service.py --port 9100

then `curl -s http://127.0.0.1:8080/route/ocr/ocr -d 'hello'` reaches it through the router.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from worker import (
    InFlightCounter,
    InFlightMiddleware,
    ProofMiddleware,
    WorkerAgent,
    WorkerConfig,
)

__all__ = ["create_app", "main"]

# Requests this service can work on at once: the record's load is in-flight / capacity.
CAPACITY = 4


def create_app(config: WorkerConfig) -> Starlette:
    """The service, with the agent running for as long as the app does."""
    counter = InFlightCounter(CAPACITY)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with WorkerAgent(config, load=counter) as agent:
            app.state.agent = agent
            yield

    async def ocr(request: Request) -> JSONResponse:
        text = (await request.body()).decode("utf-8", errors="replace")
        agent: WorkerAgent = request.app.state.agent
        return JSONResponse(
            {"worker": agent.worker_id, "text": text, "lines": len(text.splitlines())}
        )

    async def services(request: Request) -> JSONResponse:
        body = await request.json()
        agent: WorkerAgent = request.app.state.agent
        await agent.update(services=body["services"])
        return JSONResponse({"services": list(agent.config.services)})

    def running_agent() -> WorkerAgent | None:
        agent: WorkerAgent | None = getattr(app.state, "agent", None)
        return agent

    app = Starlette(
        routes=[
            Route("/ocr", ocr, methods=["POST"]),
            Route("/admin/services", services, methods=["POST"]),
        ],
        middleware=[
            Middleware(InFlightMiddleware, counter=counter),
            # The router's tunnel proof, answered with the running agent's key (read when a
            # proof is asked: the agent starts with the app's lifespan).
            Middleware(ProofMiddleware, agent=running_agent),
        ],
        lifespan=lifespan,
    )
    return app


def main() -> None:
    """Serve the example; the agent's settings come from the `RMA_*` variables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    uvicorn.run(create_app(WorkerConfig.build()), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
