"""The topology page at `GET /` and its assets under `/static/`, served by the router itself.

The page is plain HTML, CSS and a small script written for it (no CDN, no library): the script
polls `GET /topology` and draws the network in SVG. The files live beside this module, in
`static/`, so they are found from a source checkout and from an installed wheel alike (the wheel
needs them in the package data).
"""

from __future__ import annotations

import functools
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
INDEX = "topology.html"

# The page loads nothing from anywhere but this router: the browser enforces what the tests check.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # The page is tiny and changes with the router's version: always revalidate.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def _index_html() -> str:
    return (STATIC_DIR / INDEX).read_text(encoding="utf-8")


async def index(request: Request) -> Response:
    """GET /: the topology page (it fetches `/topology` itself and redraws every few seconds)."""
    return HTMLResponse(_index_html(), headers=PAGE_HEADERS)


def routes() -> list[BaseRoute]:
    """The page's routes, for the app factory: `/` and the files under `/static/`."""
    return [
        Route("/", index, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
