"""Approvals: `/approvals` lists them and takes requests from any client, `/approvals/{id}`
reads and decides one, `/approvals/{id}/wait` long-polls for the decision."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from store.models import Decide, RequestApproval
from routes.common import json_response, query_int, read_body
from store import approvals

_request = msgspec.json.Decoder(RequestApproval)
_decide = msgspec.json.Decoder(Decide)

MAX_WAIT = 3600


def _decider(request: Request) -> str:
    """Who decided: the subject of the caller's token where it has one, else "api"."""
    return request.scope.get("auth_subject") or "api"


async def list_approvals(request: Request):
    params = request.query_params
    found = await request.app.state.db.read(
        approvals.list_approvals, params.get("status"), params.get("session_id"), query_int(request, "limit", 1)
    )
    return json_response({"approvals": found})


async def request_approval(request: Request):
    body = await read_body(request, _request)
    state = request.app.state
    approval = await state.db.write(
        approvals.create_approval,
        body.session_id,
        body.tool_name,
        None if body.tool_input is None else msgspec.json.encode(body.tool_input).decode(),
        state.settings.approval_timeout,
        tool_use_id=body.tool_use_id,
        agent_id=body.agent_id,
        agent_type=body.agent_type,
    )
    state.approvals.created()
    return json_response({"approval": approval})


async def get_approval(request: Request):
    approval = await request.app.state.db.read(approvals.require_approval, request.path_params["approval_id"])
    return json_response({"approval": approval})


async def decide(request: Request):
    body = await read_body(request, _decide)
    approval = await request.app.state.approvals.decide(
        request.path_params["approval_id"], body.decision, body.reason, _decider(request)
    )
    return json_response({"approval": approval})


async def wait(request: Request):
    seconds = query_int(request, "timeout", 0, MAX_WAIT)
    if seconds is None:
        seconds = request.app.state.settings.runner_poll_timeout
    approval, _ = await request.app.state.approvals.wait(request.path_params["approval_id"], request.receive, seconds)
    return json_response({"approval": approval})


routes = [
    Route("/approvals", list_approvals, methods=["GET"]),
    Route("/approvals", request_approval, methods=["POST"]),
    Route("/approvals/{approval_id}", get_approval, methods=["GET"]),
    Route("/approvals/{approval_id}", decide, methods=["POST"]),
    Route("/approvals/{approval_id}/wait", wait, methods=["GET"]),
]
