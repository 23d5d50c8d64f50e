"""Live updates over a real server: /ws frames, SSE frames, resume, slow and many subscribers."""

import contextlib
import json
import socket
import threading

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from runner_client import wait_for
from test_sessions import SESSION_KEYS, create, event

EVENT_DATA_KEYS = [
    "event_type", "session_id", "timestamp", "tool_name", "tool_input", "tool_output", "error",
    "exit_code", "reason", "role", "content",
]


def recv(ws):
    return json.loads(ws.recv(timeout=10))


def sse_frames(response):
    """Parse an SSE stream into (fields dict | comment str) items."""
    frame = {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            yield line
        else:
            key, _, value = line.partition(": ")
            frame[key] = value


# -- /ws ----------------------------------------------------------------------------------


def test_ws_init_lists_sessions_newest_first(server):
    for sid in ("a", "b", "c"):
        create(server, sid)
    with connect(server.ws_url + "/ws") as ws:
        init = recv(ws)
    assert list(init) == ["type", "sessions"]
    assert init["type"] == "init"
    assert [s["session_id"] for s in init["sessions"]] == ["c", "b", "a"]
    assert all(list(s) == SESSION_KEYS for s in init["sessions"])


def test_ws_every_broadcast_type_with_exact_shape(server):
    with connect(server.ws_url + "/ws") as ws:
        assert recv(ws) == {"type": "init", "sessions": []}

        created = server.post("/sessions", {"session_id": "s"}).json()["session"]
        assert recv(ws) == {"type": "session_created", "session": created}

        bound = server.post("/sessions/s/bind", {"executor_session_id": "e", "hostname": "h",
                                                 "executor_type": "t"}).json()["session"]
        assert recv(ws) == {"type": "session_updated", "session": bound}

        patched = server.patch("/sessions/s/metadata", {}).json()["session"]
        assert recv(ws) == {"type": "session_updated", "session": patched}

        sent = event("s", tool_input={}, tool_output=0, unknown="kept", id="dropped")
        server.post("/sessions/s/events", sent)
        frame = recv(ws)
        # Keys beyond the known ones follow them; `id` (the stored event's own) is never taken.
        assert list(frame) == ["type", "data"] and list(frame["data"]) == [*EVENT_DATA_KEYS, "unknown"]
        assert frame["data"]["tool_input"] == {} and frame["data"]["tool_output"] == 0
        assert frame["data"]["unknown"] == "kept" and "id" not in frame["data"]

        server.post("/events", event("s", "message", role="user"))
        assert recv(ws)["data"]["role"] == "user"

        server.delete("/sessions/s")
        assert recv(ws) == {"type": "session_deleted", "session_id": "s"}


def test_ws_session_stop_sends_updated_before_event(server):
    create(server, "s")
    with connect(server.ws_url + "/ws") as ws:
        recv(ws)
        server.post("/sessions/s/events", event("s", "session_stop", exit_code=0, reason="completed"))
        first, second = recv(ws), recv(ws)
    assert first["type"] == "session_updated" and first["session"]["status"] == "finished"
    assert second["type"] == "event" and second["data"]["event_type"] == "session_stop"


def test_legacy_session_stop_sends_no_session_updated(server):
    with connect(server.ws_url + "/ws") as ws:
        recv(ws)
        server.post("/events", event("s", "session_start"))
        server.post("/events", event("s", "session_stop"))
        server.post("/sessions", {"session_id": "marker"})
        types = [recv(ws)["type"] for _ in range(3)]
    assert types == ["event", "event", "session_created"]


def test_ws_filter_and_client_frames_ignored(server):
    create(server, "mine")
    create(server, "other")
    with connect(server.ws_url + "/ws?session_id=mine") as ws:
        init = recv(ws)
        assert [s["session_id"] for s in init["sessions"]] == ["mine"]
        ws.send("keep-alive")
        server.post("/sessions/other/events", event("other"))
        server.post("/sessions/mine/events", event("mine", reason="for me"))
        frame = recv(ws)
    assert frame["data"]["reason"] == "for me"


def test_ws_since_replays_missed_events_once_then_goes_live(server):
    create(server, "s")
    for i in range(5):
        server.post("/sessions/s/events", event("s", tool_input={"i": i}))
    cursor = server.get("/sessions/s/events").json()["events"][1]["id"]
    with connect(server.ws_url + f"/ws?since={cursor}") as ws:
        init = recv(ws)
        assert init["type"] == "init" and "cursor" in init
        replayed = [recv(ws) for _ in range(3)]
        assert [f["data"]["tool_input"]["i"] for f in replayed] == [2, 3, 4]
        assert [f["cursor"] for f in replayed] == sorted(f["cursor"] for f in replayed)
        server.post("/sessions/s/events", event("s", tool_input={"i": 5}))
        live = recv(ws)
    assert live["data"]["tool_input"] == {"i": 5} and live["cursor"] > replayed[-1]["cursor"]


def test_ws_replay_gap_after_deleted_events(server):
    create(server, "gone")
    create(server, "kept")
    server.post("/sessions/gone/events", event("gone"))
    server.post("/sessions/kept/events", event("kept", reason="still here"))
    server.delete("/sessions/gone")
    with connect(server.ws_url + "/ws?since=0") as ws:
        recv(ws)
        frames = [recv(ws) for _ in range(4)]
    gap, created, kept, deleted = frames
    assert gap == {"type": "replay_gap", "since": 0, "earliest": created["cursor"], "cursor": 0}
    assert created["type"] == "session_created" and created["session"]["session_id"] == "kept"
    assert kept["data"]["reason"] == "still here"
    # Of the deleted session, only its deletion is left to replay.
    assert deleted == {"type": "session_deleted", "session_id": "gone", "cursor": deleted["cursor"]}
    assert [f["cursor"] for f in frames[1:]] == sorted({f["cursor"] for f in frames[1:]})


class StalledClient:
    """A raw WebSocket peer that completes the handshake and then stops reading."""

    def __init__(self, port: int, path: str):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.stream = self.sock.makefile("rb")
        while self.stream.readline() not in (b"\r\n", b""):
            pass  # response headers

    def frames(self):
        """Read again: yields (opcode, payload) until the connection ends."""
        self.sock.settimeout(15)
        while header := self.stream.read(2):
            size = header[1] & 0x7F
            if size >= 126:
                size = int.from_bytes(self.stream.read(2 if size == 126 else 8), "big")
            yield header[0] & 0x0F, self.stream.read(size)

    def close(self):
        self.stream.close()
        self.sock.close()


def test_stalled_subscriber_dropped_while_healthy_one_gets_everything(make_server):
    srv = make_server(broadcast_queue_size=8)
    create(srv, "s")
    total = 100
    stalled = StalledClient(srv.port, "/ws?since=0")
    with connect(srv.ws_url + "/ws") as healthy:
        received = []

        def read_all():
            recv(healthy)
            while len(received) < total:
                received.append(recv(healthy)["data"]["tool_input"]["i"])

        reader = threading.Thread(target=read_all)
        reader.start()
        wait_for(lambda: srv.state.broadcaster.subscriber_count == 2)
        big = "x" * 50_000  # enough to fill every socket buffer on the way
        for i in range(total):
            assert srv.post("/sessions/s/events", event("s", tool_input={"i": i, "pad": big})).status_code == 200
        reader.join(timeout=30)
        assert received == list(range(total))
    assert srv.state.broadcaster.dropped_total == 1
    wait_for(lambda: srv.state.broadcaster.subscriber_count == 0)
    # The stalled peer, reading again, finds what it had and then a clear close.
    cursors, close = [], None
    for opcode, payload in stalled.frames():
        if opcode == 0x1:
            cursors.append(json.loads(payload)["cursor"])
        elif opcode == 0x8:
            close = payload
            break
    stalled.close()
    assert int.from_bytes(close[:2], "big") == 1013 and b"since" in close[2:]
    # Resuming from its last cursor brings every missed change exactly once: the session's
    # creation, then its events.
    with connect(srv.ws_url + f"/ws?since={cursors[-1]}") as ws:
        recv(ws)
        resumed = [recv(ws)["cursor"] for _ in range(total + 2 - len(cursors))]
    all_ids = [e["id"] for e in srv.get("/sessions/s/events").json()["events"]]
    created, *events = cursors[1:] + resumed
    assert events == all_ids and created < all_ids[0]


def test_many_subscribers_come_and_go_without_leaks(server):
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(server.ws_url + "/ws")) for _ in range(40)]
        for ws in clients:
            recv(ws)
        assert server.state.broadcaster.subscriber_count == 40
    wait_for(lambda: server.state.broadcaster.subscriber_count == 0)
    responses = [requests.get(server.url + "/sse/sessions", stream=True, timeout=10) for _ in range(10)]
    wait_for(lambda: server.state.broadcaster.subscriber_count == 10)
    for r in responses:
        r.close()
    create(server, "nudge")  # a write to a closed socket is what reveals the disconnect
    wait_for(lambda: server.state.broadcaster.subscriber_count == 0)


def test_subscriber_limit(make_server):
    srv = make_server(max_subscribers=1)
    with connect(srv.ws_url + "/ws") as first:
        recv(first)
        with connect(srv.ws_url + "/ws") as second:
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=10)
        assert closed.value.rcvd.code == 1013
        r = srv.get("/sse/sessions")
        assert r.status_code == 503 and r.json()["detail"].startswith("Too many")


# -- SSE ----------------------------------------------------------------------------------


def test_sse_headers_init_and_live_frames(server):
    create(server, "s")
    with requests.get(server.url + "/sse/sessions", stream=True, timeout=10,
                      headers={"Origin": "http://dash.example"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        assert r.headers["access-control-allow-origin"] == "*"
        frames = sse_frames(r)
        init = next(frames)
        assert init["event"] == "init"
        assert [s["session_id"] for s in json.loads(init["data"])["sessions"]] == ["s"]
        server.post("/sessions/s/events", event("s", "session_stop"))
        updated, ev = next(frames), next(frames)
    assert updated["event"] == "session_updated"
    assert json.loads(updated["data"])["session"]["status"] == "finished"
    assert ev["event"] == "event" and "type" not in json.loads(ev["data"])
    stored_id = server.get("/sessions/s/events").json()["events"][0]["id"]
    assert int(ev["id"]) == stored_id  # the frame id is the stored event id
    assert int(updated["id"]) <= stored_id


def test_sse_filter_include_init_and_heartbeat(make_server):
    srv = make_server(sse_heartbeat_interval=0.2)
    create(srv, "mine")
    create(srv, "other")
    with requests.get(srv.url + "/sse/sessions?session_id=mine&include_init=false&created_by=x",
                      stream=True, timeout=10) as r:
        frames = sse_frames(r)
        assert next(frames) == ": heartbeat"  # no init; nothing else yet
        srv.post("/sessions/other/events", event("other"))
        srv.post("/sessions/mine/events", event("mine", reason="mine"))
        item = next(frames)
        while item == ": heartbeat":
            item = next(frames)
    assert json.loads(item["data"])["data"]["reason"] == "mine"
    assert srv.get("/sse/sessions?include_init=maybe").status_code == 422


@pytest.mark.parametrize("how", ["header", "query"])
def test_sse_last_event_id_replays_then_live(server, how):
    create(server, "s")
    for i in range(4):
        server.post("/sessions/s/events", event("s", tool_input={"i": i}))
    first_id = server.get("/sessions/s/events").json()["events"][0]["id"]
    kwargs = ({"headers": {"Last-Event-ID": str(first_id)}} if how == "header"
              else {"params": {"last_event_id": first_id}})
    with requests.get(server.url + "/sse/sessions", stream=True, timeout=10, **kwargs) as r:
        frames = sse_frames(r)
        replayed = [next(frames) for _ in range(3)]  # no init when resuming
        server.post("/sessions/s/events", event("s", tool_input={"i": 4}))
        live = next(frames)
    got = [json.loads(f["data"])["data"]["tool_input"]["i"] for f in replayed + [live]]
    assert got == [1, 2, 3, 4]
    assert [f["event"] for f in replayed + [live]] == ["event"] * 4


def test_sse_foreign_last_event_id_means_no_init_no_replay(server):
    create(server, "s")
    server.post("/sessions/s/events", event("s"))
    with requests.get(server.url + "/sse/sessions", stream=True, timeout=10,
                      headers={"Last-Event-ID": "1735555555000-evt-001"}) as r:
        frames = sse_frames(r)
        server.post("/sessions", {"session_id": "new"})
        assert next(frames)["event"] == "session_created"


def test_sse_replay_gap(server):
    create(server, "gone")
    server.post("/sessions/gone/events", event("gone"))
    server.delete("/sessions/gone")
    with requests.get(server.url + "/sse/sessions", stream=True, timeout=10,
                      headers={"Last-Event-ID": "0"}) as r:
        frames = sse_frames(r)
        gap, deleted = next(frames), next(frames)
    assert gap["event"] == "replay_gap"
    assert json.loads(gap["data"]) == {"since": 0, "earliest": int(deleted["id"])}
    assert deleted["event"] == "session_deleted" and json.loads(deleted["data"]) == {"session_id": "gone"}
