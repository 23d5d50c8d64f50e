"""The change log behind the live streams, against a real server: every subscriber gets every
committed change exactly once, in cursor order, whatever the writers do at the same time and
however often it drops and resumes; memory per subscriber is bounded in bytes."""

import json
import random
import signal
import threading
import time

import apsw
import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from runner_client import wait_for
from server_process import ServerProcess
from store.sqlite import MIGRATIONS
from test_live import StalledClient, recv, sse_frames
from test_sessions import create, event


def stored_log(server) -> list[tuple[int, str, str]]:
    """(cursor, type, session_id) of every change in the database, in cursor order."""
    sql = "SELECT id, type, session_id FROM changes ORDER BY id"
    return server.state.db.read_sync(lambda conn: [tuple(row) for row in conn.execute(sql)])


def writer(server, name: str, count: int, seed: int, acknowledged: list) -> None:
    """A client doing what clients do, at random: sessions created and deleted, events on both
    routes, `session_stop`s; every 2xx noted."""
    rng = random.Random(seed)
    http = requests.Session()
    mine: list[str] = []
    for i in range(count):
        action = rng.random()
        if not mine or action < 0.15:
            sid = f"{name}-{i}"
            r = http.post(server.url + "/sessions", json={"session_id": sid}, timeout=30)
            mine.append(sid)
        elif action < 0.2:
            sid = mine.pop(rng.randrange(len(mine)))
            r = http.delete(server.url + f"/sessions/{sid}", timeout=30)
        elif action < 0.3:
            sid = rng.choice(mine)
            r = http.post(server.url + f"/sessions/{sid}/events", json=event(sid, "session_stop"), timeout=30)
        elif action < 0.45:
            sid = rng.choice(mine)
            r = http.post(server.url + "/events", json=event(sid, "session_start"), timeout=30)
        elif action < 0.6:
            sid = rng.choice(mine)
            r = http.post(server.url + "/events", json=event(sid, tool_input={"n": i}), timeout=30)
        else:
            sid = rng.choice(mine)
            r = http.post(server.url + f"/sessions/{sid}/events", json=event(sid, tool_input={"n": i}), timeout=30)
        assert r.status_code == 200, r.text
        acknowledged.append(r)


class Subscriber(threading.Thread):
    """Follows the log over WebSocket or SSE, hanging up after a random number of frames and
    resuming from the last cursor it received, until it has reached `until`."""

    def __init__(self, server, transport: str, seed: int):
        super().__init__(daemon=True)
        self.server, self.transport, self.rng = server, transport, random.Random(seed)
        self.received: list[tuple[int, str, str | None]] = []  # (cursor, type, session_id)
        self.gaps: list[dict] = []
        self.cursor = 0
        self.until: int | None = None  # set once the writers are done
        self.resumes = 0
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.until is not None and self.cursor >= self.until

    def note(self, cursor: int, type_: str, payload: dict) -> None:
        if type_ == "replay_gap":
            self.gaps.append(payload)
            return
        session_id = payload.get("session_id") or (payload.get("session") or payload.get("data") or {}).get("session_id")
        self.received.append((cursor, type_, session_id))
        self.cursor = cursor

    def run(self):
        try:
            deadline = time.monotonic() + 120
            while not self.done():
                assert time.monotonic() < deadline, "subscriber did not catch up"
                (self.ws_round if self.transport == "ws" else self.sse_round)(self.rng.randint(1, 60))
                self.resumes += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def ws_round(self, frames: int) -> None:
        with connect(self.server.ws_url + f"/ws?since={self.cursor}") as ws:
            init = recv(ws)
            assert init["type"] == "init" and init["cursor"] == self.cursor
            for _ in range(frames):
                if self.done():
                    return
                try:
                    frame = json.loads(ws.recv(timeout=0.5))
                except TimeoutError:
                    continue
                type_, cursor = frame.pop("type"), frame.pop("cursor")
                self.note(cursor, type_, frame)

    def sse_round(self, frames: int) -> None:
        headers = {"Last-Event-ID": str(self.cursor)}
        with requests.get(self.server.url + "/sse/sessions", stream=True, headers=headers, timeout=10) as r:
            for frame in sse_frames(r):
                if not isinstance(frame, str):  # else a heartbeat
                    self.note(int(frame["id"]), frame["event"], json.loads(frame["data"]))
                    frames -= 1
                if frames == 0 or self.done():
                    return


def test_every_subscriber_gets_every_change_once_in_order_across_drops(make_server):
    srv = make_server(sse_heartbeat_interval=0.2)
    subscribers = [Subscriber(srv, transport, seed) for seed, transport in enumerate(["ws", "ws", "sse", "sse"])]
    for subscriber in subscribers:
        subscriber.start()
    acknowledged: list = []
    writers = [threading.Thread(target=writer, args=(srv, f"w{n}", 250, n, acknowledged)) for n in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(timeout=120)
    assert len(acknowledged) == 4 * 250
    log = stored_log(srv)
    for subscriber in subscribers:
        subscriber.until = log[-1][0]
    for subscriber in subscribers:
        subscriber.join(timeout=120)
        assert subscriber.error is None, repr(subscriber.error)

    assert_every_change_once(subscribers, log)


def assert_every_change_once(subscribers: list[Subscriber], log: list[tuple[int, str, str]]) -> None:
    """Each subscriber got every change of the stored log once, in cursor order, across more
    than three resumes; anything else it got was seen live and then deleted with its session."""
    stored = {cursor: (type_, sid) for cursor, type_, sid in log}
    deleted = {sid for _, type_, sid in log if type_ == "session_deleted"}
    for subscriber in subscribers:
        cursors = [cursor for cursor, _, _ in subscriber.received]
        assert cursors == sorted(set(cursors)), "a cursor came twice or out of order"
        assert set(stored) <= set(cursors), "a committed change was never delivered"
        for cursor, type_, sid in subscriber.received:
            if cursor in stored:
                assert stored[cursor] == (type_, sid)
            else:  # seen live, then deleted with its session before the end
                assert sid in deleted
        assert subscriber.resumes > 3


def test_session_stop_announced_before_its_event_and_in_commit_order(server):
    create(server, "s")
    with connect(server.ws_url + "/ws?since=0") as ws:
        recv(ws)
        recv(ws)  # session_created
        barrier = threading.Barrier(2)

        def post(body):
            barrier.wait()
            assert server.post("/sessions/s/events", body).status_code == 200

        threads = [threading.Thread(target=post, args=(event("s", kind),)) for kind in ("session_stop", "tool_call")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        frames = [recv(ws) for _ in range(3)]
    cursors = [frame["cursor"] for frame in frames]
    assert cursors == sorted(cursors)
    stop_at = next(i for i, f in enumerate(frames) if f["type"] == "event" and f["data"]["event_type"] == "session_stop")
    assert frames[stop_at - 1]["type"] == "session_updated"
    assert frames[stop_at - 1]["session"]["status"] == "finished"
    ids = {e["id"]: e["event_type"] for e in server.get("/sessions/s/events").json()["events"]}
    assert {f["cursor"]: f["data"]["event_type"] for f in frames if f["type"] == "event"} == ids


def test_init_cursor_is_where_the_stream_goes_on(server):
    create(server, "a")
    with requests.get(server.url + "/sse/sessions", stream=True, timeout=10) as r:
        frames = sse_frames(r)
        init = next(frames)
        server.post("/sessions/a/events", event("a"))
        live = next(frames)
    assert init["event"] == "init" and int(init["id"]) < int(live["id"])
    # Resuming from the init cursor gives what came after it, and nothing else.
    with connect(server.ws_url + f"/ws?since={init['id']}") as ws:
        init_again = recv(ws)
        assert init_again["cursor"] == int(init["id"])
        replayed = recv(ws)
    assert replayed["cursor"] == int(live["id"]) and replayed["type"] == "event"


def test_drop_in_the_middle_of_a_replay_resumes_without_loss(server):
    create(server, "s")
    for i in range(150):
        server.post("/sessions/s/events", event("s", tool_input={"i": i}))
    got: list[int] = []
    with connect(server.ws_url + "/ws?since=0") as ws:
        assert recv(ws)["cursor"] == 0
        got += [recv(ws)["cursor"] for _ in range(70)]
    with connect(server.ws_url + f"/ws?since={max(got)}") as ws:
        assert recv(ws)["cursor"] == max(got)
        got += [recv(ws)["cursor"] for _ in range(151 - len(got))]
        server.post("/sessions/s/events", event("s", reason="live"))
        live = recv(ws)
    assert got == [cursor for cursor, _, _ in stored_log(server)][:151]
    assert live["data"]["reason"] == "live" and live["cursor"] > got[-1]


def test_replay_follows_the_session_filter(server):
    create(server, "mine")
    create(server, "other")
    server.post("/sessions/other/events", event("other"))
    server.post("/sessions/mine/events", event("mine", "session_stop"))
    with requests.get(server.url + "/sse/sessions?session_id=mine", stream=True, timeout=10,
                      headers={"Last-Event-ID": "0"}) as r:
        frames = sse_frames(r)
        got = [next(frames) for _ in range(3)]
    assert [f["event"] for f in got] == ["session_created", "session_updated", "event"]
    assert all("mine" in f["data"] for f in got)


BUDGET = 256 * 1024
LAST_WITHOUT_LOG = 6  # the schema version before the change log


def test_a_stalled_subscriber_is_dropped_at_its_byte_budget(make_server):
    srv = make_server(subscriber_buffer_bytes=BUDGET, broadcast_queue_size=100_000, metrics_enabled=True)
    create(srv, "s")
    stalled = StalledClient(srv.port, "/ws")
    total = 120
    with connect(srv.ws_url + "/ws") as healthy:
        recv(healthy)
        received: list[int] = []

        def read_all():
            while len(received) < total:
                received.append(recv(healthy)["data"]["tool_input"]["i"])

        reader = threading.Thread(target=read_all)
        reader.start()
        wait_for(lambda: srv.state.broadcaster.subscriber_count == 2)
        pad = "x" * 100_000
        most = 0
        for i in range(total):
            assert srv.post("/sessions/s/events", event("s", tool_input={"i": i, "pad": pad})).status_code == 200
            most = max(most, srv.state.broadcaster.buffered_bytes)
        reader.join(timeout=30)
    assert received == list(range(total))
    assert srv.state.broadcaster.dropped_total == 1  # the stalled one, long before all was sent
    assert 0 < most <= 2 * (BUDGET + 100_500)  # two queues, each within its budget plus one event
    metrics = srv.get("/metrics").text
    assert "coordinator_live_buffered_bytes" in metrics and "coordinator_live_subscribers_dropped_total 1.0" in metrics
    stalled.close()


def test_replays_to_stalled_subscribers_hold_one_page_each(make_server):
    srv = make_server(subscriber_buffer_bytes=BUDGET)
    create(srv, "s")
    pad = "y" * 200_000
    for i in range(40):  # 8 MB to replay
        srv.post("/sessions/s/events", event("s", tool_input={"i": i, "pad": pad}))
    stalled = [StalledClient(srv.port, "/ws?since=0") for _ in range(4)]
    wait_for(lambda: srv.state.broadcaster.subscriber_count == 4)
    # Each is stuck on a page it cannot send; none holds more than a page of the budget's size.
    wait_for(lambda: srv.state.broadcaster.buffered_bytes > 0)
    assert srv.state.broadcaster.buffered_bytes <= 4 * (BUDGET + 200_500)
    # A healthy subscriber replaying at the same time gets everything.
    with connect(srv.ws_url + "/ws?since=0") as ws:
        recv(ws)
        cursors = [recv(ws)["cursor"] for _ in range(41)]
    assert cursors == [cursor for cursor, _, _ in stored_log(srv)]
    for client in stalled:
        client.close()
    wait_for(lambda: srv.state.broadcaster.subscriber_count == 0)


@pytest.mark.parametrize("kind", ["ws", "sse"])
def test_changes_before_a_restart_replay_after_it(make_server, kind):
    first = make_server()
    create(first, "s")
    first.post("/sessions/s/events", event("s", "session_stop"))
    first.stop()
    second = make_server()
    expected = [(cursor, type_) for cursor, type_, _ in stored_log(second)]
    if kind == "ws":
        with connect(second.ws_url + "/ws?since=0") as ws:
            recv(ws)
            got = [recv(ws) for _ in range(3)]
        assert [(f["cursor"], f["type"]) for f in got] == expected
    else:
        with requests.get(second.url + "/sse/sessions", stream=True, timeout=10, headers={"Last-Event-ID": "0"}) as r:
            frames = sse_frames(r)
            got = [next(frames) for _ in range(3)]
        assert [(int(f["id"]), f["event"]) for f in got] == expected


def test_sigterm_ends_every_live_stream_at_once(tmp_path):
    with ServerProcess(tmp_path / "project") as server:
        assert server.post("/sessions", json={"session_id": "s"}).status_code == 200
        with connect(f"ws://127.0.0.1:{server.port}/ws?since=0") as ws, \
                requests.get(server.url + "/sse/sessions", stream=True, timeout=10) as sse:
            frames = sse_frames(sse)
            assert next(frames)["event"] == "init"
            assert [recv(ws)["type"] for _ in range(2)] == ["init", "session_created"]
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1001 and "since" in closed.value.rcvd.reason
            assert list(frames) == []  # the stream simply ends
        assert server.proc.wait(timeout=10) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < 5  # a bound: the graceful shutdown would wait 10 s
        assert "Traceback" not in server.log()


@pytest.mark.sqlite_only
def test_cursors_of_the_release_before_the_log_still_resume(make_server, project_dir):
    """A database from before the change log: its event ids were the cursors clients kept."""
    path = project_dir / ".agent-orchestrator" / "observability.db"
    path.parent.mkdir(parents=True)
    conn = apsw.Connection(str(path))
    for number, script in enumerate(MIGRATIONS[:LAST_WITHOUT_LOG], start=1):
        conn.execute(script)
        conn.execute(f"PRAGMA user_version={number}")
    conn.execute("INSERT INTO sessions (session_id, status, created_at) VALUES ('old', 'running', 't')")
    for i in range(5):
        conn.execute("INSERT INTO events (session_id, event_type, timestamp) VALUES ('old', ?, 't')", (f"e{i}",))
    conn.execute("DELETE FROM events WHERE event_type = 'e4'")  # the newest id was handed out, then deleted
    conn.close()

    srv = make_server()
    kept = [e["id"] for e in srv.get("/sessions/old/events").json()["events"]]
    assert kept == [1, 2, 3, 4]
    srv.post("/sessions/old/events", event("old", reason="new"))
    with connect(srv.ws_url + "/ws?since=2") as ws:  # a cursor kept from the old release
        recv(ws)
        gap, *frames = [recv(ws) for _ in range(4)]
    assert gap["type"] == "replay_gap"  # event 5 was deleted: it cannot be replayed
    assert [(f["cursor"], f["data"]["event_type"]) for f in frames] == [(3, "e2"), (4, "e3"), (6, "post_tool")]
    assert frames[-1]["data"]["reason"] == "new"  # new cursors go on after every old event id
