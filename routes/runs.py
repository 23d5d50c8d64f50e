"""Runs: /runs (queue, list, read, stop) and /sessions/{id}/stop."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
from starlette.requests import Request
from starlette.routing import Route

from routes.common import json_response, read_body
from routes.errors import ValidationFailed
from store import runners, runs
from store.agents import read_agent
from store.models import CreateRun
from store.stamps import new_session_id

_create = msgspec.json.Decoder(CreateRun)


async def _blueprint_demands(request: Request, agent_name: str | None) -> dict[str, Any] | None:
    """The demands of the named blueprint; an unknown agent simply has none."""
    if not agent_name:
        return None
    agent = await anyio.to_thread.run_sync(read_agent, request.app.state.settings.agents_dir, agent_name)
    return msgspec.to_builtins(agent.demands) if agent is not None and agent.demands is not None else None


async def create_run(request: Request):
    body = await read_body(request, _create)
    if body.type == "resume_session" and body.session_id is None:
        raise ValidationFailed.one(["body", "session_id"], "Field required to resume a session", "missing")
    additional = msgspec.to_builtins(body.additional_demands) if body.additional_demands else None
    run = runs.new_run(
        body.session_id or new_session_id(),
        body.type,
        body.prompt,
        agent_name=body.agent_name,
        project_dir=body.project_dir,
        parent_session_id=body.parent_session_id,
        execution_mode=body.execution_mode or "sync",
        demands=runs.merge_demands(await _blueprint_demands(request, body.agent_name), additional),
    )
    settings = request.app.state.settings
    dispatcher = request.app.state.dispatcher
    run, _, claimed = await request.app.state.db.write(
        runners.create_run_for_waiting,
        run,
        no_match_timeout=settings.run_no_match_timeout,
        waiting=dispatcher.idle_runners(),
    )
    if claimed is not None:
        await dispatcher.hand_over(*claimed)
    if claimed is None or claimed[1].run_id != run.run_id:  # the new run is still pending
        dispatcher.wake()
    return json_response({"run_id": run.run_id, "session_id": run.session_id, "status": run.status})


async def list_runs(request: Request):
    found = await request.app.state.db.read(runs.list_runs, request.query_params.get("status"))
    return json_response({"runs": found})


async def get_run(request: Request):
    return json_response(await request.app.state.db.read(runs.require_run, request.path_params["run_id"]))


async def _stop(request: Request, verb, key: str):
    stopped = await request.app.state.db.write(verb, request.path_params[key])
    if stopped.runner_id is not None:
        request.app.state.dispatcher.wake(stopped.runner_id)
    return json_response(stopped.reply)


async def stop_run(request: Request):
    return await _stop(request, runs.stop_run, "run_id")


async def stop_session(request: Request):
    return await _stop(request, runs.stop_session, "session_id")


routes = [
    Route("/runs", create_run, methods=["POST"]),
    Route("/runs", list_runs, methods=["GET"]),
    Route("/runs/{run_id}", get_run, methods=["GET"]),
    Route("/runs/{run_id}/stop", stop_run, methods=["POST"]),
    Route("/sessions/{session_id}/stop", stop_session, methods=["POST"]),
]
