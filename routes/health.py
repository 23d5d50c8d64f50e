"""Liveness for Docker and load balancers."""

from starlette.requests import Request
from starlette.routing import Route

from routes.common import json_response


async def health(request: Request):
    return json_response({"status": "healthy"})


routes = [Route("/health", health, methods=["GET"])]
