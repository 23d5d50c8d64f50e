"""The live page at `/`: one static HTML file (no build step, no external resources) that
follows sessions and events over `/ws`, resuming from its last cursor after a drop."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Package data, read once: the page is a constant of the installed package.
PAGE = resources.files(__package__).joinpath("page.html").read_bytes()

HEADERS = {
    "Cache-Control": "no-cache",
    # Inline script and style only; network access to this origin only (fetch and /ws).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self';"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


async def page(request: Request):
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=HEADERS)


routes = [Route("/", page, methods=["GET"])]
