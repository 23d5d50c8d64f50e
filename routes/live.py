"""Live updates: the WebSocket `/ws` and the SSE stream `/sse/sessions`. Transports only: the
broadcaster decides what is sent, in which order, and who is too slow to keep."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Callable

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator_core.broadcast import Ended, Message, Subscriber, TooManySubscribers, encode
from routes.common import SQL_INT_MAX, query_bool, upgrade_required
from store import cache, sessions

log = logging.getLogger("coordinator.live")

CLOSE_TIMEOUT = 10.0  # for the close frame to get through to a peer that fell behind
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN = 1013
CLOSE_POLICY = 1008


async def _init_message(request, subscriber: Subscriber) -> Message:
    """All sessions (newest first), or only the filtered one. Its cursor is where the stream
    goes on from (the resume cursor, else the newest change when the subscriber joined), so it
    is never above the next message's."""
    broadcaster = request.app.state.broadcaster
    cursor = subscriber.cursor
    if subscriber.session_id is None:
        found = await request.app.state.db.read_cached(cache.SESSIONS, sessions.list_sessions_json)
        return broadcaster.init_message(found, cursor)
    one = await request.app.state.db.read(sessions.get_session, subscriber.session_id)
    return encode("init", {"sessions": [one] if one else []}, subscriber.session_id, cursor)


async def _messages(
    request, subscriber: Subscriber, init: bool, idle: float | None = None
) -> AsyncIterator[Message | None]:
    """What one subscriber receives: `init`, then every change after its cursor (None after
    each `idle` seconds without one)."""
    if init:
        yield await _init_message(request, subscriber)
    async for message in request.app.state.broadcaster.follow(subscriber, idle):
        yield message


def _cursor_param(raw: str | None) -> int | None:
    """A resume cursor; anything but a non-negative integer SQLite can hold means "no resume"."""
    # isdigit() alone lets through digits int() refuses ("²") and more than fits in SQLite.
    if raw is None or not (raw.isascii() and raw.isdigit() and len(raw) <= 19) or int(raw) > SQL_INT_MAX:
        return None
    return int(raw)


# -- WebSocket ----------------------------------------------------------------------------


async def ws_endpoint(websocket: WebSocket):
    params = websocket.query_params
    session_id = params.get("session_id")
    since = _cursor_param(params.get("since"))
    broadcaster = websocket.app.state.broadcaster
    await websocket.accept()
    if broadcaster.full:
        await websocket.close(CLOSE_TRY_AGAIN, "Too many live subscribers, try again later")
        return
    if since is not None:
        await broadcaster.reach(since)
    with broadcaster.subscribe(session_id, since) as subscriber:
        async with anyio.create_task_group() as tasks:
            # Whichever ends first ends the subscription: the peer leaves, the broadcaster
            # drops it or shuts down (even while a send is stuck on a full socket), or sending fails.
            stop = tasks.cancel_scope.cancel
            tasks.start_soon(_ignore_client_frames, websocket, stop)
            tasks.start_soon(_call_when_ended, subscriber, stop)
            await _send_frames(websocket, _messages(websocket, subscriber, True), since is not None)
            stop()
        if subscriber.ended == "shutdown":  # while still subscribed: the shutdown waits for it
            await _goodbye(websocket, subscriber.ended)
    if subscriber.ended == "dropped":  # no longer counted among the subscribers
        await _goodbye(websocket, subscriber.ended)


async def _goodbye(websocket: WebSocket, why: str) -> None:
    code, reason = _CLOSE[why]
    with anyio.move_on_after(CLOSE_TIMEOUT):
        await websocket.close(code, reason)


_CLOSE = {
    "dropped": (CLOSE_TRY_AGAIN, "Subscriber fell behind; reconnect with since=<last cursor>"),
    "shutdown": (CLOSE_GOING_AWAY, "Server shutting down; reconnect with since=<last cursor>"),
}


async def _ignore_client_frames(websocket: WebSocket, on_disconnect: Callable[[], None]) -> None:
    """Read (and drop) client keep-alives; a disconnect ends the subscription at once."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass
    on_disconnect()


async def _call_when_ended(subscriber: Subscriber, stop: Callable[[], None]) -> None:
    await subscriber.wait_ended()
    stop()


async def _send_frames(websocket: WebSocket, messages: AsyncIterator[Message], with_cursor: bool) -> None:
    """Send until the peer leaves or is dropped. No timer per frame: a peer stuck on a full
    socket is dropped by the broadcaster once its queue fills, a dead one closed by uvicorn's
    ping timeout."""
    with contextlib.suppress(Ended, WebSocketDisconnect, OSError):
        async for message in messages:
            await websocket.send_text(message.ws_frame_cursor if with_cursor else message.ws_frame)


# -- Server-sent events -------------------------------------------------------------------

SSE_HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


async def sse_sessions(request: Request):
    session_id = request.query_params.get("session_id")
    include_init = query_bool(request, "include_init", True)
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    since = _cursor_param(last_event_id)
    # As in the reference, a client that resumes gets no `init` (whether or not its id is ours).
    init = include_init and last_event_id is None
    broadcaster = request.app.state.broadcaster
    if broadcaster.full:
        raise HTTPException(503, "Too many live subscribers, try again later")
    heartbeat = request.app.state.settings.sse_heartbeat_interval

    async def stream() -> AsyncIterator[bytes]:
        # Subscribing here, not in the handler, means a response that never starts leaks nothing.
        try:
            if since is not None:
                await broadcaster.reach(since)
            with broadcaster.subscribe(session_id, since) as subscriber:
                async for message in _messages(request, subscriber, init, heartbeat):
                    yield b": heartbeat\n\n" if message is None else message.sse_frame
        except (Ended, TooManySubscribers):
            log.info("SSE subscriber ended early; it may resume with Last-Event-ID")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


routes = [
    WebSocketRoute("/ws", ws_endpoint),
    Route("/sse/sessions", sse_sessions, methods=["GET"]),
    Route("/ws", upgrade_required, methods=["GET"]),
]
