"""Sessions and their events: /sessions..., and the legacy /events routes the dashboard uses."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from routes.common import json_response, query_int, read_body
from routes.errors import ValidationFailed
from routes.open_events import EventDecoder
from store import cache, events, sessions
from store.errors import NotFound
from store.models import BindSession, CreateSession, Session, SessionMetadata

_create = msgspec.json.Decoder(CreateSession)
_bind = msgspec.json.Decoder(BindSession)
_metadata = msgspec.json.Decoder(SessionMetadata)
_event = EventDecoder()

MAX_PAGE = 1000


def _session_ok(session: Session) -> Response:
    return json_response({"ok": True, "session": session})


async def list_sessions(request: Request):
    status = request.query_params.get("status")
    limit = query_int(request, "limit", 1)
    db = request.app.state.db
    if status is None and limit is None:
        found = await db.read_cached(cache.SESSIONS, sessions.list_sessions_json)
    else:
        found = await db.read(sessions.list_sessions_json, status, limit)
    return Response(found, media_type="application/json")


async def create_session(request: Request):
    body = await read_body(request, _create)
    session = await request.app.state.db.write(
        sessions.create_session,
        body.session_id,
        project_dir=body.project_dir,
        agent_name=body.agent_name,
        parent_session_id=body.parent_session_id,
        execution_mode=body.execution_mode or "sync",
    )
    return _session_ok(session)


async def get_session(request: Request):
    session = await request.app.state.db.read(sessions.require_session, request.path_params["session_id"])
    return json_response({"session": session})


async def get_status(request: Request):
    session = await request.app.state.db.read(sessions.get_session, request.path_params["session_id"])
    return json_response({"status": session.status if session else "not_existent"})


async def get_result(request: Request):
    result = await request.app.state.db.read(sessions.session_result, request.path_params["session_id"])
    return json_response({"result": result})


async def get_affinity(request: Request):
    s = await request.app.state.db.read(sessions.require_session, request.path_params["session_id"])
    affinity = {
        "session_id": s.session_id,
        "executor_session_id": s.executor_session_id,
        "hostname": s.hostname,
        "project_dir": s.project_dir,
        "executor_type": s.executor_type,
    }
    return json_response({"affinity": affinity})


async def bind_session(request: Request):
    body = await read_body(request, _bind)
    session = await request.app.state.db.write(
        sessions.bind_session,
        request.path_params["session_id"],
        body.executor_session_id,
        body.hostname,
        body.executor_type,
        body.project_dir,
    )
    return _session_ok(session)


async def patch_metadata(request: Request):
    body = await read_body(request, _metadata)
    fields = {name: getattr(body, name) for name in body.__struct_fields__}
    session = await request.app.state.db.write(sessions.update_metadata, request.path_params["session_id"], **fields)
    return _session_ok(session)


async def delete_session(request: Request):
    session_id = request.path_params["session_id"]
    count = await request.app.state.db.write(sessions.delete_session, session_id)
    return json_response({"ok": True, "session_id": session_id, "deleted": {"session": True, "events_count": count}})


async def post_event(request: Request):
    session_id = request.path_params["session_id"]
    db = request.app.state.db
    try:
        event, extra = await read_body(request, _event)
    except ValidationFailed:
        # An unknown session is reported before a malformed body.
        await db.read(sessions.require_session, session_id)
        raise
    _, finished = await db.write(events.append_event, session_id, event, extra)
    if finished is not None:
        await request.app.state.dispatcher.session_stopped(session_id)  # callbacks to parents
    return json_response({"ok": True})


async def post_legacy_event(request: Request):
    event, extra = await read_body(request, _event)
    await request.app.state.db.write(events.append_legacy_event, event, extra)
    return json_response({"ok": True})


async def _events_page(request: Request, known_session: bool) -> Response:
    session_id = request.path_params["session_id"]
    after = query_int(request, "after", 0)
    limit = query_int(request, "limit", 1, MAX_PAGE)
    db = request.app.state.db
    if after is None and limit is None:
        body = await db.read_cached(cache.events_key(session_id), events.session_events_json, session_id)
        if body is None and known_session:
            raise NotFound(sessions.SESSION_NOT_FOUND)
        body = body or b'{"events":[]}'
    else:
        body = await db.read(events.events_page_json, session_id, after, limit, known_session)
    return Response(body, media_type="application/json")


async def list_events(request: Request):
    return await _events_page(request, known_session=True)


async def list_legacy_events(request: Request):
    # Never 404: an unknown session simply has no events.
    return await _events_page(request, known_session=False)


# Starlette tries routes in order: the ones hit on every tool call and dashboard poll first.
routes = [
    Route("/sessions/{session_id}/events", post_event, methods=["POST"]),
    Route("/events", post_legacy_event, methods=["POST"]),
    Route("/sessions/{session_id}/events", list_events, methods=["GET"]),
    Route("/events/{session_id}", list_legacy_events, methods=["GET"]),
    Route("/sessions", list_sessions, methods=["GET"]),
    Route("/sessions", create_session, methods=["POST"]),
    Route("/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/sessions/{session_id}", delete_session, methods=["DELETE"]),
    Route("/sessions/{session_id}/status", get_status, methods=["GET"]),
    Route("/sessions/{session_id}/result", get_result, methods=["GET"]),
    Route("/sessions/{session_id}/affinity", get_affinity, methods=["GET"]),
    Route("/sessions/{session_id}/bind", bind_session, methods=["POST"]),
    Route("/sessions/{session_id}/metadata", patch_metadata, methods=["PATCH"]),
]
