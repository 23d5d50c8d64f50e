"""The runner protocol: /runner/register, the /runner/runs long-poll, run reports, heartbeats,
and /runners for the dashboard."""

from __future__ import annotations

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from routes.common import json_response, query_bool, read_body
from routes.errors import ValidationFailed
from routes.metrics import observe_claim
from store import runners
from store.models import RegisterRunner, RunFailed, RunnerReport

_register = msgspec.json.Decoder(RegisterRunner)
_report = msgspec.json.Decoder(RunnerReport)
_failed = msgspec.json.Decoder(RunFailed)

_OK = {"ok": True}


async def _as_runner(request: Request, verb, *args):
    """Run a write verb on behalf of a runner: an unknown runner is answered 401."""
    try:
        return await request.app.state.db.write(verb, *args)
    except runners.UnknownRunner:
        raise HTTPException(401, "Runner not registered") from None


def _seconds(value: float) -> float | int:
    """Whole seconds as an integer, as the reference sends them."""
    return int(value) if value == int(value) else value


async def register(request: Request):
    body = await read_body(request, _register)
    try:
        runner = await request.app.state.db.write(
            runners.register_runner, body.hostname, body.project_dir, body.executor_type, body.tags,
            request.app.state.dispatcher.started_at,
        )
    except runners.DuplicateRunner as exc:
        raise HTTPException(409, exc.detail) from None
    settings = request.app.state.settings
    return json_response({
        "runner_id": runner.runner_id,
        "poll_endpoint": "/runner/runs",
        "poll_timeout_seconds": _seconds(settings.runner_poll_timeout),
        "heartbeat_interval_seconds": _seconds(settings.runner_heartbeat_interval),
    })


async def poll(request: Request):
    runner_id = request.query_params.get("runner_id")
    if runner_id is None:
        raise ValidationFailed.one(["query", "runner_id"], "Field required", "missing")
    try:
        outcome = await request.app.state.dispatcher.poll(runner_id, request.receive)
    except runners.UnknownRunner:
        raise HTTPException(401, "Runner not registered") from None
    if outcome is None:
        return Response(status_code=204)
    if "run" in outcome:
        observe_claim(request.app.state, outcome["run"])
    return json_response(outcome)


async def _report_run(request: Request, status: str, decoder: msgspec.json.Decoder = _report):
    body = await read_body(request, decoder)
    error = getattr(body, "error", None)
    _, resumed = await _as_runner(
        request, runners.report, body.runner_id, request.path_params["run_id"], status, error
    )
    if resumed is not None:
        request.app.state.dispatcher.wake()
    return json_response(_OK)


async def run_started(request: Request):
    return await _report_run(request, "running")


async def run_completed(request: Request):
    return await _report_run(request, "completed")


async def run_failed(request: Request):
    return await _report_run(request, "failed", _failed)


async def run_stopped(request: Request):
    return await _report_run(request, "stopped")


async def heartbeat(request: Request):
    body = await read_body(request, _report)
    await _as_runner(request, runners.heartbeat, body.runner_id)
    return json_response(_OK)


async def list_runners(request: Request):
    return json_response({"runners": await request.app.state.db.read(runners.list_runners)})


async def deregister(request: Request):
    runner_id = request.path_params["runner_id"]
    self_initiated = query_bool(request, "self", False)
    await request.app.state.db.write(runners.deregister_runner, runner_id, self_initiated)
    request.app.state.dispatcher.wake(runner_id)
    if self_initiated:
        return json_response({"ok": True, "message": "Runner deregistered", "initiated_by": "self"})
    return json_response({"ok": True, "message": "Runner marked for deregistration", "initiated_by": "external"})


routes = [
    Route("/runner/register", register, methods=["POST"]),
    Route("/runner/runs", poll, methods=["GET"]),
    Route("/runner/runs/{run_id}/started", run_started, methods=["POST"]),
    Route("/runner/runs/{run_id}/completed", run_completed, methods=["POST"]),
    Route("/runner/runs/{run_id}/failed", run_failed, methods=["POST"]),
    Route("/runner/runs/{run_id}/stopped", run_stopped, methods=["POST"]),
    Route("/runner/heartbeat", heartbeat, methods=["POST"]),
    Route("/runners", list_runners, methods=["GET"]),
    Route("/runners/{runner_id}", deregister, methods=["DELETE"]),
]
