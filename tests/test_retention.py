"""Retention: the store verb and the pass through `Database.write` on each backend, and the
periodic task of a running server (deletes and broadcasts)."""

import json
import time

import anyio
from websockets.sync.client import connect as ws_connect

from store.changes import max_deleted
from store.retention import delete_expired_sessions, purge
from test_sessions import create, event

OLD = "2025-01-01T00:00:00.000000+00:00"
NEW = "2025-06-01T00:00:00.000000+00:00"
CUTOFF = "2025-03-01T00:00:00.000000+00:00"


def add_session(conn, session_id, status="finished", created_at=OLD, events=0, run=None, parent=None):
    conn.execute(
        "INSERT INTO sessions (session_id, status, created_at, parent_session_id) VALUES (?, ?, ?, ?)",
        (session_id, status, created_at, parent),
    )
    conn.executemany(
        "INSERT INTO events (session_id, event_type, timestamp) VALUES (?, 'message', ?)",
        [(session_id, created_at)] * events,
    )
    if run is not None:
        conn.execute(
            "INSERT INTO runs (run_id, session_id, type, prompt, status, created_at)"
            " VALUES (?, ?, 'start_session', 'p', ?, ?)",
            ("run_" + session_id, session_id, run, created_at),
        )


def ids(conn, table, column="session_id"):
    return sorted(row[0] for row in conn.execute(f"SELECT DISTINCT {column} FROM {table}"))


def test_deletes_old_sessions_that_are_over_with_their_events_and_runs(store_db):
    db = store_db
    db.write_sync(add_session, "finished", events=3, run="completed")
    db.write_sync(add_session, "stopped", status="stopped", created_at="2025-01-02T00:00:00.000000+00:00",
                  run="stopped")
    db.write_sync(add_session, "running", status="running", events=1)
    db.write_sync(add_session, "recent", created_at=NEW, events=1)
    db.write_sync(add_session, "run_pending", run="pending")
    db.write_sync(add_session, "callback_queued")
    db.write_sync(lambda conn: conn.execute(
        "INSERT INTO callbacks (parent_session_id, child_session_id, failed) VALUES ('callback_queued', 'c', 0)"
    ))
    db.write_sync(add_session, "child", status="running", created_at=NEW, parent="finished")
    newest_deleted = db.read_sync(
        lambda conn: conn.execute("SELECT max(id) FROM events WHERE session_id = 'finished'").fetchone()[0]
    )

    assert db.write_sync(delete_expired_sessions, CUTOFF) == ["finished", "stopped"]  # oldest first

    assert db.read_sync(ids, "sessions") == ["callback_queued", "child", "recent", "run_pending", "running"]
    assert db.read_sync(ids, "events") == ["recent", "running"]
    assert db.read_sync(ids, "runs", "run_id") == ["run_run_pending"]
    parent = "SELECT parent_session_id FROM sessions WHERE session_id = 'child'"
    assert db.read_sync(lambda conn: tuple(conn.execute(parent).fetchone())) == (None,)
    assert db.read_sync(max_deleted) == newest_deleted  # live subscribers learn of the gap
    assert db.write_sync(delete_expired_sessions, CUTOFF) == []


def test_batches_are_bounded_by_sessions_and_by_events(store_db):
    db = store_db
    db.write_sync(lambda conn: [add_session(conn, f"s{i:03}") for i in range(250)])
    assert [len(db.write_sync(delete_expired_sessions, CUTOFF)) for _ in range(4)] == [100, 100, 50, 0]

    for i in range(5):
        db.write_sync(add_session, f"e{i}", events=5)
    db.write_sync(add_session, "big", created_at="2025-01-02T00:00:00.000000+00:00", events=50)
    batches = [db.write_sync(delete_expired_sessions, CUTOFF, max_events=12) for _ in range(5)]
    assert batches == [["e0", "e1"], ["e2", "e3"], ["e4"], ["big"], []]  # a big session goes alone


def test_purge_runs_batches_through_the_writer(store_db):
    db = store_db
    db.write_sync(lambda conn: [add_session(conn, f"s{i:03}", status="stopped", events=2) for i in range(230)])
    db.write_sync(add_session, "young", created_at="9999-01-01T00:00:00.000000+00:00")
    assert anyio.run(purge, db, 1.0) == 230
    tombstones = "SELECT session_id FROM changes WHERE type = 'session_deleted' ORDER BY id"
    assert [row[0] for row in db.read_sync(lambda conn: conn.execute(tombstones).fetchall())] == [
        f"s{i:03}" for i in range(230)
    ]
    assert db.read_sync(ids, "sessions") == ["young"]
    assert db.read_sync(ids, "events") == []


def test_server_deletes_old_finished_sessions_and_tells_live_clients(make_server):
    # 0.000001 days is 86 ms: sessions are old almost at once; passes every 50 ms.
    srv = make_server(retention_days=0.000001, retention_interval=0.05)
    with ws_connect(srv.ws_url + "/ws") as ws:
        create(srv, "done")
        create(srv, "live")
        srv.post("/sessions/done/events", event("done", "session_stop"))
        srv.post("/sessions/live/bind", {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
        deadline = time.monotonic() + 10
        while (frame := json.loads(ws.recv(timeout=10)))["type"] != "session_deleted":
            assert time.monotonic() < deadline, "no session_deleted broadcast"
    assert frame == {"type": "session_deleted", "session_id": "done"}
    assert srv.get("/sessions/done").status_code == 404
    assert srv.get("/events/done").json() == {"events": []}
    assert srv.get("/sessions/live").json()["session"]["status"] == "running"
