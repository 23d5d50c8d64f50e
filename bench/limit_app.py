"""The practical limit of this stack: the coordinator's hot routes on bare Starlette, answering
constant JSON with no storage. Fan-out and dispatch do the minimum work those need (in-memory
subscriber queues, an in-memory run queue with wake-ups) so that their latency is comparable."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

OK = b'{"ok":true}'
SESSION = msgspec.json.encode(
    {"session_id": "ses_000000000000", "status": "running", "created_at": "2025-01-01T00:00:00.000000+00:00",
     "project_dir": "/p", "agent_name": "a", "last_resumed_at": None, "parent_session_id": None,
     "execution_mode": "sync", "executor_session_id": None, "executor_type": None, "hostname": None}
)
EVENT = msgspec.json.encode(
    {"id": 1, "session_id": "ses_000000000000", "event_type": "post_tool", "timestamp": "2025-01-01T00:00:00+00:00",
     "tool_name": "Bash", "tool_input": {"command": "ls -la " + "x" * 600}, "tool_output": "y" * 300,
     "error": None, "exit_code": None, "reason": None, "role": None, "content": None}
)
SESSIONS_1000 = b'{"sessions":[' + b",".join([SESSION] * 1000) + b"]}"
EVENTS = {n: b'{"events":[' + b",".join([EVENT] * n) + b"]}" for n in (100, 1000)}

subscribers: set[asyncio.Queue] = set()
runs: deque[bytes] = deque()
run_ready = asyncio.Event()
run_ids = itertools.count()


def json(body: bytes, status: int = 200) -> Response:
    return Response(body, status, media_type="application/json")


async def post_event(request: Request):
    body = await request.body()
    msgspec.json.decode(body)
    frame = b'{"type":"event","data":' + body + b"}"
    for queue in subscribers:
        queue.put_nowait(frame)
    return json(OK)


async def list_sessions(request: Request):
    return json(SESSIONS_1000)


async def list_events(request: Request):
    # The benchmark names its sessions by size: ses_100, ses_1000.
    return json(EVENTS[int(request.path_params["session_id"].rpartition("_")[2])])


async def create_session(request: Request):
    msgspec.json.decode(await request.body())
    return json(b'{"ok":true,"session":' + SESSION + b"}")


async def create_run(request: Request):
    msgspec.json.decode(await request.body())
    run_id = f"run_{next(run_ids):012d}"
    runs.append(run_id.encode())
    run_ready.set()
    return json(b'{"run_id":"%s","session_id":"ses_x","status":"pending"}' % run_id.encode())


async def poll(request: Request):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not runs:
        run_ready.clear()
        try:
            await asyncio.wait_for(run_ready.wait(), deadline - loop.time())
        except TimeoutError:
            return Response(status_code=204)
        if await request.is_disconnected():  # never hand a run to a client that left
            return Response(status_code=204)
    return json(b'{"run":{"run_id":"%s","status":"claimed"}}' % runs.popleft())


async def register(request: Request):
    return json(b'{"runner_id":"lnch_000000000000","poll_endpoint":"/runner/runs",'
                b'"poll_timeout_seconds":30,"heartbeat_interval_seconds":60}')


async def ws(websocket: WebSocket):
    await websocket.accept()
    queue: asyncio.Queue = asyncio.Queue(1000)
    subscribers.add(queue)
    await websocket.send_text('{"type":"init","sessions":[]}')

    async def drain_client():
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    reader = asyncio.ensure_future(drain_client())
    try:
        while not reader.done():
            await websocket.send_text((await queue.get()).decode())
    except WebSocketDisconnect:
        pass
    finally:
        subscribers.discard(queue)
        reader.cancel()


app = Starlette(
    routes=[
        Route("/sessions", list_sessions, methods=["GET"]),
        Route("/sessions", create_session, methods=["POST"]),
        Route("/sessions/{session_id}/events", post_event, methods=["POST"]),
        Route("/sessions/{session_id}/events", list_events, methods=["GET"]),
        Route("/events", post_event, methods=["POST"]),
        Route("/runs", create_run, methods=["POST"]),
        Route("/runner/register", register, methods=["POST"]),
        Route("/runner/runs", poll, methods=["GET"]),
        WebSocketRoute("/ws", ws),
    ]
)
