"""The practical limits of this stack: the coordinator's hot routes on bare Starlette, answering
constant JSON. Fan-out and dispatch do the minimum work those need (in-memory subscriber queues,
an in-memory run queue with wake-ups) so that their latency is comparable.

`app` (the bare app) stores nothing. `durable_app` answers each write (an event, a session, a
run, a runner's report) only once its raw body is appended to a file and `fdatasync`ed, group
committed (bench/journal.py): the simplest durable design, the limit for a coordinator that
acknowledges only what is on disk. Reads are the same constant JSON in both."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import deque
from pathlib import Path

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench.journal import Journal

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


async def store(request: Request) -> bytes:
    """The request's JSON body, once stored (durable app) or at once (bare app)."""
    body = await request.body()
    msgspec.json.decode(body)
    if request.app.state.journal is not None:
        await request.app.state.journal.append(body)
    return body


async def post_event(request: Request):
    body = await store(request)
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
    await store(request)
    return json(b'{"ok":true,"session":' + SESSION + b"}")


async def create_run(request: Request):
    await store(request)
    run_id = f"run_{next(run_ids):012d}"
    runs.append(run_id.encode())
    run_ready.set()
    return json(b'{"run_id":"%s","session_id":"ses_x","status":"pending"}' % run_id.encode())


async def poll(request: Request):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    gone = False

    async def watch_disconnect():  # a GET has no body to read: the next message is the disconnect
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        run_ready.set()

    watcher = asyncio.ensure_future(watch_disconnect())
    try:
        while not runs:
            run_ready.clear()
            try:
                await asyncio.wait_for(run_ready.wait(), deadline - loop.time())
            except TimeoutError:
                return Response(status_code=204)
            if gone:  # never hand a run to a client that left
                return Response(status_code=204)
    finally:
        watcher.cancel()
    return json(b'{"run":{"run_id":"%s","status":"claimed"}}' % runs.popleft())


async def report(request: Request):
    """A runner's `started` or `completed`."""
    await store(request)
    return json(OK)


async def register(request: Request):
    return json(b'{"runner_id":"lnch_000000000000","poll_endpoint":"/runner/runs",'
                b'"poll_timeout_seconds":30,"heartbeat_interval_seconds":60}')


async def ws(websocket: WebSocket):
    await websocket.accept()
    queue: asyncio.Queue = asyncio.Queue(1000)
    subscribers.add(queue)

    async def send_frames():
        with contextlib.suppress(WebSocketDisconnect):
            await websocket.send_text('{"type":"init","sessions":[]}')
            while True:
                await websocket.send_text((await queue.get()).decode())

    sender = asyncio.ensure_future(send_frames())
    try:  # until the client leaves
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    finally:
        subscribers.discard(queue)
        sender.cancel()


routes = [
    Route("/sessions", list_sessions, methods=["GET"]),
    Route("/sessions", create_session, methods=["POST"]),
    Route("/sessions/{session_id}/events", post_event, methods=["POST"]),
    Route("/sessions/{session_id}/events", list_events, methods=["GET"]),
    Route("/events", post_event, methods=["POST"]),
    Route("/runs", create_run, methods=["POST"]),
    Route("/runner/register", register, methods=["POST"]),
    Route("/runner/runs", poll, methods=["GET"]),
    Route("/runner/runs/{run_id}/started", report, methods=["POST"]),
    Route("/runner/runs/{run_id}/completed", report, methods=["POST"]),
    WebSocketRoute("/ws", ws),
]


@contextlib.asynccontextmanager
async def journaled(app: Starlette):
    # Beside where the coordinator keeps its database: the same file system.
    directory = Path(os.environ.get("AGENT_ORCHESTRATOR_PROJECT_DIR", "."))
    app.state.journal = Journal(directory / "journal.log")
    try:
        yield
    finally:
        app.state.journal.close()


app = Starlette(routes=routes)
app.state.journal = None
durable_app = Starlette(routes=routes, lifespan=journaled)
