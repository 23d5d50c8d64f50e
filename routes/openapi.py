"""OpenAPI 3.1 at `GET /openapi.json`, generated from the msgspec Structs.

`OPERATIONS` names, for every route, the Struct its body is decoded into and the types of its
answers; the schemas themselves come from msgspec (`schema_components`), so they follow the
Structs. Envelopes that routes build as plain objects (`{"ok": true, "session": ...}`) are
described by the small `*Reply` Structs below; they forbid unknown keys, so the tests, which
validate real answers against this document, notice when a route and its entry drift apart.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.routing import Route

from routes.common import json_response
from store.agents import Agent, CreateAgent, StatusUpdate, UpdateAgent
from store.models import (
    Approval, BindSession, ClaudeCodeHook, CreateRun, CreateSession, Decide, Event, EventRow, RegisterRunner,
    RequestApproval, Run, Runner, RunFailed, RunnerReport, Session, SessionMetadata,
)

REF = "#/components/schemas/{name}"


class _Reply(msgspec.Struct, forbid_unknown_fields=True):
    """An answer's exact keys."""


class OkReply(_Reply):
    ok: Literal[True]


class HealthReply(_Reply):
    status: Literal["healthy"]


class SessionsReply(_Reply):
    sessions: list[Session]


class SessionReply(_Reply):
    session: Session


class SessionOkReply(_Reply):
    ok: Literal[True]
    session: Session


class DeletedCounts(_Reply):
    session: Literal[True]
    events_count: int


class SessionDeletedReply(_Reply):
    ok: Literal[True]
    session_id: str
    deleted: DeletedCounts


class StatusReply(_Reply):
    status: str  # a session status, or `not_existent`


class ResultReply(_Reply):
    result: str


class Affinity(_Reply):
    session_id: str
    executor_session_id: str | None
    hostname: str | None
    project_dir: str | None
    executor_type: str | None


class AffinityReply(_Reply):
    affinity: Affinity


class EventsReply(_Reply):
    events: list[EventRow]


class StopReply(_Reply):
    ok: Literal[True]
    session_id: str
    status: str
    run_id: str | UnsetType = UNSET
    message: str | UnsetType = UNSET


class RunCreatedReply(_Reply):
    run_id: str
    session_id: str
    status: Literal["pending"]


class RunsReply(_Reply):
    runs: list[Run]


class RegisteredReply(_Reply):
    runner_id: str
    poll_endpoint: str
    poll_timeout_seconds: float
    heartbeat_interval_seconds: float


class PollRunReply(_Reply):
    run: Run


class PollStopsReply(_Reply):
    stop_runs: list[str]


class PollDeregisteredReply(_Reply):
    deregistered: Literal[True]


class RunnersReply(_Reply):
    runners: list[Runner]


class DeregisteredReply(_Reply):
    ok: Literal[True]
    message: str
    initiated_by: Literal["self", "external"]


class ApprovalsReply(_Reply):
    approvals: list[Approval]


class ApprovalReply(_Reply):
    approval: Approval


# What a Claude Code hook reads back (its hooks reference): no decision, or one in the format of
# the hook that asked.
class NoDecision(_Reply):
    """`{}`: Claude Code goes on as without the hook."""


class PreToolUseDecision(_Reply):
    hookEventName: Literal["PreToolUse"]
    permissionDecision: Literal["allow", "deny", "ask"]
    permissionDecisionReason: str


class PreToolUseReply(_Reply):
    hookSpecificOutput: PreToolUseDecision


class PermissionBehavior(_Reply):
    behavior: Literal["allow", "deny"]
    message: str | UnsetType = UNSET


class PermissionRequestDecision(_Reply):
    hookEventName: Literal["PermissionRequest"]
    decision: PermissionBehavior


class PermissionRequestReply(_Reply):
    hookSpecificOutput: PermissionRequestDecision


class Problem(_Reply):
    type: str
    loc: list[str | int]
    msg: str


class ValidationErrorReply(_Reply):
    detail: list[Problem]


class ErrorReply(_Reply):
    detail: Any  # a message; an object for a duplicate runner


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    type: Any
    description: str
    required: bool = False


@dataclass(frozen=True)
class Op:
    """One operation: its JSON body type, its answers by status (a type for JSON, a tuple of
    types for one of them, None for no body, a media type string for anything else), its
    error statuses with when each happens, and its query parameters."""

    summary: str
    answers: dict[int, Any]
    body: Any = None
    errors: dict[int, str] = field(default_factory=dict)
    query: dict[str, Query] = field(default_factory=dict)


Limit = Annotated[int, msgspec.Meta(ge=1)]
PageLimit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
After = Annotated[int, msgspec.Meta(ge=0)]
WaitSeconds = Annotated[int, msgspec.Meta(ge=0, le=3600)]
PAGING = {
    "after": Query(After, "only events with a greater id, ascending by id"),
    "limit": Query(PageLimit, "at most this many events"),
}
POLL_ANSWERS = (PollRunReply, PollStopsReply, PollDeregisteredReply)  # untagged: one of them
# The route refuses what the Struct alone cannot say: a resume names the session it resumes.
NewRun = Annotated[CreateRun, msgspec.Meta(extra_json_schema={
    "if": {"properties": {"type": {"const": "resume_session"}}, "required": ["type"]},
    "then": {"properties": {"session_id": {"type": "string"}}, "required": ["session_id"]},
})]
# An SSE stream is described by one of its events, as schema checkers read `text/event-stream`
# (OpenAPI 3.2 calls it `itemSchema`); other answers that are not JSON are text.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the cursor to resume after"},
        "event": {"type": "string", "description": "the message type, as `type` on /ws"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["id", "event", "data"],
}
MEDIA_SCHEMAS = {"text/event-stream": SSE_EVENT}
TEXT = {"type": "string"}

NO_SESSION = {404: "no such session"}
RUNNER = {401: "the runner is not registered", 404: "no such run"}

LINKED_OUT = "the blueprint links outside the agents directory (SECURITY.md)"
NO_APPROVAL = {404: "no such approval"}
HOOK_ANSWERS = (NoDecision, PreToolUseReply, PermissionRequestReply)

OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/health"): Op("Liveness", {200: HealthReply}),
    ("GET", "/"): Op("The live page", {200: "text/html"}),
    ("GET", "/openapi.json"): Op("This document", {200: dict[str, Any]}),
    ("GET", "/metrics"): Op(
        "Prometheus metrics (METRICS_ENABLED)", {200: "text/plain"}, errors={404: "METRICS_ENABLED is off"}
    ),
    # sessions and events
    ("GET", "/sessions"): Op(
        "List sessions, newest first", {200: SessionsReply}, errors={422: "`limit` is not a positive integer"},
        query={"status": Query(str, "only this status"), "limit": Query(Limit, "the first N")},
    ),
    ("POST", "/sessions"): Op(
        "Create a session", {200: SessionOkReply}, CreateSession,
        {404: "no such parent session", 409: "the session exists"},
    ),
    ("GET", "/sessions/{session_id}"): Op("A session", {200: SessionReply}, errors=NO_SESSION),
    ("DELETE", "/sessions/{session_id}"): Op(
        "Delete a session with its events and runs", {200: SessionDeletedReply}, errors=NO_SESSION
    ),
    ("GET", "/sessions/{session_id}/status"): Op("A session's status", {200: StatusReply}),
    ("GET", "/sessions/{session_id}/result"): Op(
        "The final assistant text of a finished session", {200: ResultReply},
        errors={400: "the session has not finished", 404: "no such session, or it has no result"},
    ),
    ("GET", "/sessions/{session_id}/affinity"): Op("Where a session runs", {200: AffinityReply}, errors=NO_SESSION),
    ("POST", "/sessions/{session_id}/bind"): Op(
        "An executor took the session", {200: SessionOkReply}, BindSession, NO_SESSION
    ),
    ("PATCH", "/sessions/{session_id}/metadata"): Op(
        "Update session fields", {200: SessionOkReply}, SessionMetadata, NO_SESSION
    ),
    ("GET", "/sessions/{session_id}/events"): Op(
        "A session's events", {200: EventsReply},
        errors=NO_SESSION | {422: "`after` or `limit` out of range"}, query=PAGING,
    ),
    ("POST", "/sessions/{session_id}/events"): Op(
        "Record an event", {200: OkReply}, Event,
        {400: "the body's `session_id` is not the one in the path", 404: "no such session (checked before the body)"},
    ),
    ("POST", "/sessions/{session_id}/stop"): Op(
        "Stop a session's active run", {200: StopReply}, errors=NO_SESSION | {400: "its run cannot be stopped"}
    ),
    ("POST", "/events"): Op(
        "Record an event (legacy)", {200: OkReply}, Event, {404: "no such session (but `session_start` creates it)"}
    ),
    ("GET", "/events/{session_id}"): Op(
        "A session's events (legacy)", {200: EventsReply}, errors={422: "`after` or `limit` out of range"},
        query=PAGING,
    ),
    # live updates
    ("GET", "/ws"): Op(
        "WebSocket of live updates (init, then one frame per message)", {101: None},
        errors={426: "a plain HTTP request, without the WebSocket upgrade"},
        query={
            "session_id": Query(str, "only this session"),
            "since": Query(After, "resume: replay stored events after this cursor; frames carry `cursor`"),
        },
    ),
    ("GET", "/sse/sessions"): Op(
        "Server-sent events of live updates", {200: "text/event-stream"},
        errors={422: "`include_init` is not a boolean", 503: "too many live subscribers"},
        query={
            "session_id": Query(str, "only this session"),
            "include_init": Query(bool, "send `init` first (default true)"),
            "last_event_id": Query(str, "resume, as the Last-Event-ID header"),
            "created_by": Query(str, "accepted and ignored"),
        },
    ),
    # runs
    ("POST", "/runs"): Op(
        "Queue a run", {200: RunCreatedReply}, NewRun,
        {
            404: "no such session to resume, or no such parent session",
            409: "a new session's `session_id` exists",
            422: "a malformed body, or a resume without `session_id`",
        },
    ),
    ("GET", "/runs"): Op("List runs", {200: RunsReply}, query={"status": Query(str, "only this status")}),
    ("GET", "/runs/{run_id}"): Op("A run", {200: Run}, errors={404: "no such run"}),
    ("POST", "/runs/{run_id}/stop"): Op(
        "Stop a run", {200: StopReply}, errors={400: "the run has ended or has no runner", 404: "no such run"}
    ),
    # runners
    ("POST", "/runner/register"): Op(
        "Register a runner", {200: RegisteredReply}, RegisterRunner,
        {409: "a runner with this hostname, project_dir and executor_type is registered; `detail` is an object"},
    ),
    ("GET", "/runner/runs"): Op(
        "Long-poll for work: a run, stop commands or a deregistration; 204 when the wait ends empty",
        {200: POLL_ANSWERS, 204: None}, errors={401: RUNNER[401], 422: "no `runner_id`"},
        query={"runner_id": Query(str, "the polling runner", required=True)},
    ),
    ("POST", "/runner/runs/{run_id}/started"): Op("Report a run started", {200: OkReply}, RunnerReport, RUNNER),
    ("POST", "/runner/runs/{run_id}/completed"): Op("Report a run completed", {200: OkReply}, RunnerReport, RUNNER),
    ("POST", "/runner/runs/{run_id}/failed"): Op("Report a run failed", {200: OkReply}, RunFailed, RUNNER),
    ("POST", "/runner/runs/{run_id}/stopped"): Op("Report a run stopped", {200: OkReply}, RunnerReport, RUNNER),
    ("POST", "/runner/heartbeat"): Op("A runner's sign of life", {200: OkReply}, RunnerReport, {401: RUNNER[401]}),
    ("GET", "/runners"): Op("List runners", {200: RunnersReply}),
    ("DELETE", "/runners/{runner_id}"): Op(
        "Deregister a runner", {200: DeregisteredReply}, errors={404: "no such runner", 422: "`self` is not a boolean"},
        query={"self": Query(bool, "the runner itself is leaving (default false)")},
    ),
    # Claude Code hooks and approvals
    ("POST", "/hooks/claude-code"): Op(
        "A Claude Code HTTP hook, any event: stored as an event of its session; the answer is no decision,"
        " or, for a tool call an approval rule holds, the decision once made",
        {200: HOOK_ANSWERS}, ClaudeCodeHook,
    ),
    ("GET", "/approvals"): Op(
        "List approvals, newest first", {200: ApprovalsReply}, errors={422: "`limit` is not a positive integer"},
        query={
            "status": Query(str, "only this status: pending, decided or expired"),
            "session_id": Query(str, "only this session's"),
            "limit": Query(Limit, "the first N"),
        },
    ),
    ("POST", "/approvals"): Op(
        "Ask a person whether a tool call may run", {200: ApprovalReply}, RequestApproval, NO_SESSION
    ),
    ("GET", "/approvals/{approval_id}"): Op("An approval", {200: ApprovalReply}, errors=NO_APPROVAL),
    ("POST", "/approvals/{approval_id}"): Op(
        "Decide an approval: its held hook request is answered at once", {200: ApprovalReply}, Decide,
        NO_APPROVAL | {409: "it was decided or expired before"},
    ),
    ("GET", "/approvals/{approval_id}/wait"): Op(
        "Long-poll for the decision: the approval once decided, or as it is when the wait ends",
        {200: ApprovalReply}, errors=NO_APPROVAL | {422: "`timeout` out of range"},
        query={"timeout": Query(WaitSeconds, "seconds to wait at most (default RUNNER_POLL_TIMEOUT)")},
    ),
    # agents
    ("GET", "/agents"): Op("List agent blueprints", {200: list[Agent]}, query={"tags": Query(str, "all of these, comma-separated")}),
    ("POST", "/agents"): Op(
        "Create an agent blueprint", {201: Agent}, CreateAgent,
        {400: "the name is not a valid directory name", 409: "the agent exists"},
    ),
    ("GET", "/agents/{name}"): Op(
        "An agent blueprint", {200: Agent}, errors={403: LINKED_OUT, 404: "no such agent"}
    ),
    ("PATCH", "/agents/{name}"): Op(
        "Update an agent blueprint", {200: Agent}, UpdateAgent, {403: LINKED_OUT, 404: "no such agent"}
    ),
    ("DELETE", "/agents/{name}"): Op("Delete an agent blueprint", {204: None}, errors={404: "no such agent"}),
    ("PATCH", "/agents/{name}/status"): Op(
        "Activate or deactivate a blueprint", {200: Agent}, StatusUpdate, {403: LINKED_OUT, 404: "no such agent"}
    ),
}

# Every body may be too large (413) or malformed (422).
BODY_ERRORS = {413: "the body is larger than MAX_BODY_BYTES", 422: "a malformed body"}
_PATH_PARAM = re.compile(r"{(\w+)}")


def _error_type(status: int) -> type:
    return ValidationErrorReply if status == 422 else ErrorReply


def _types() -> list[Any]:
    """Every type the document refers to, once, in a stable order."""
    found: dict[Any, None] = {ErrorReply: None, ValidationErrorReply: None}
    for op in OPERATIONS.values():
        for kind in (op.body, *op.answers.values(), *(q.type for q in op.query.values())):
            for one in kind if isinstance(kind, tuple) else (kind,):
                if one is not None and not isinstance(one, str):
                    found[one] = None
    return list(found)


def _content(media_type: str, schema: dict) -> dict:
    return {"content": {media_type: {"schema": schema}}}


@functools.cache
def document() -> dict[str, Any]:
    types = _types()
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    schema = dict(zip(types, schemas))
    paths: dict[str, dict] = {}
    for (method, path), op in OPERATIONS.items():
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAM.findall(path)
        ] + [
            {"name": name, "in": "query", "required": q.required, "description": q.description, "schema": schema[q.type]}
            for name, q in op.query.items()
        ]
        responses: dict[str, dict] = {}
        for status, kind in op.answers.items():
            if kind is None:
                responses[str(status)] = {"description": op.summary}
            elif isinstance(kind, str):
                text = MEDIA_SCHEMAS.get(kind, TEXT)
                responses[str(status)] = {"description": op.summary} | _content(kind, text)
            else:
                body = {"oneOf": [schema[one] for one in kind]} if isinstance(kind, tuple) else schema[kind]
                responses[str(status)] = {"description": op.summary} | _content("application/json", body)
        errors = BODY_ERRORS | op.errors if op.body else op.errors
        for status, when in sorted(errors.items()):
            responses[str(status)] = {"description": when} | _content("application/json", schema[_error_type(status)])
        operation: dict[str, Any] = {"summary": op.summary, "responses": responses}
        if parameters:
            operation["parameters"] = parameters
        if op.body is not None:
            operation["requestBody"] = {"required": True} | _content("application/json", schema[op.body])
        paths.setdefault(path, {})[method.lower()] = operation
    try:
        version = metadata.version("agent-coordinator")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown"
    return {
        "openapi": "3.1.0",
        "info": {"title": "Agent Coordinator", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # Only when COORDINATOR_API_TOKEN is set; `/health` never needs it.
        "security": [{}, {"bearer": []}],
    }


async def openapi(request: Request):
    return json_response(document())


routes = [Route("/openapi.json", openapi, methods=["GET"])]
