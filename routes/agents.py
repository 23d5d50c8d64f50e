"""Agent blueprints: /agents... over the agents directory. Agent changes are never broadcast."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from routes.common import json_response, read_body
from routes.errors import from_msgspec
from store import agents
from store.agents import CreateAgent, StatusUpdate, UpdateAgent

T = TypeVar("T")

# Agent bodies are decoded in two steps: MCP entries may leave out `type` (stdio), which a
# tagged union cannot default.
_object = msgspec.json.Decoder(dict[str, Any])
_status = msgspec.json.Decoder(StatusUpdate)


def _agents_dir(request: Request) -> Path:
    return request.app.state.settings.agents_dir


async def _agent_body(request: Request, type_: type[T]) -> T:
    body = await read_body(request, _object)
    try:
        return agents.from_body(body, type_)
    except msgspec.ValidationError as exc:
        raise from_msgspec(exc) from None


async def list_agents(request: Request):
    raw = request.query_params.get("tags") or ""
    tags = [tag.strip() for tag in raw.split(",") if tag.strip()]
    found = await anyio.to_thread.run_sync(agents.list_agents, _agents_dir(request), tags)
    return json_response(found)


async def get_agent(request: Request):
    name = request.path_params["name"]
    return json_response(await anyio.to_thread.run_sync(agents.require_agent, _agents_dir(request), name))


async def create_agent(request: Request):
    body = await _agent_body(request, CreateAgent)
    return json_response(await anyio.to_thread.run_sync(agents.create_agent, _agents_dir(request), body), 201)


async def update_agent(request: Request):
    body = await _agent_body(request, UpdateAgent)
    name = request.path_params["name"]
    return json_response(await anyio.to_thread.run_sync(agents.update_agent, _agents_dir(request), name, body))


async def delete_agent(request: Request):
    await anyio.to_thread.run_sync(agents.delete_agent, _agents_dir(request), request.path_params["name"])
    return Response(status_code=204)


async def set_status(request: Request):
    body = await read_body(request, _status)
    name = request.path_params["name"]
    return json_response(await anyio.to_thread.run_sync(agents.set_status, _agents_dir(request), name, body.status))


routes = [
    Route("/agents", list_agents, methods=["GET"]),
    Route("/agents", create_agent, methods=["POST"]),
    Route("/agents/{name}", get_agent, methods=["GET"]),
    Route("/agents/{name}", update_agent, methods=["PATCH"]),
    Route("/agents/{name}", delete_agent, methods=["DELETE"]),
    Route("/agents/{name}/status", set_status, methods=["PATCH"]),
]
