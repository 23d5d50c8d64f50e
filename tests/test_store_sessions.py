"""Session, event, change-log and count verbs on each backend's real database, through its
`Database` (the run, runner and callback verbs are in test_store_runs, retention in
test_retention)."""

import threading

import msgspec
import pytest

from store import changes, events, sessions, stats
from store.errors import Conflict, NotFound, Rejected
from store.models import Event


def ev(session_id: str, event_type: str = "post_tool", timestamp: str = "2025-01-01T00:00:00.000000+00:00",
       **fields) -> Event:
    return msgspec.convert({"event_type": event_type, "session_id": session_id, "timestamp": timestamp, **fields},
                           Event)


def decoded(body: bytes | None):
    return None if body is None else msgspec.json.decode(body)


def log(db) -> list[tuple[int, str, str | None]]:
    sql = "SELECT id, type, session_id FROM changes ORDER BY id"
    return db.read_sync(lambda conn: [tuple(row) for row in conn.execute(sql)])


# -- sessions -----------------------------------------------------------------------------


def test_create_get_and_conflicts(store_db):
    created = store_db.write_sync(sessions.create_session, "a", project_dir="/p", execution_mode="async_poll")
    assert (created.status, created.project_dir, created.execution_mode) == ("pending", "/p", "async_poll")
    assert store_db.read_sync(sessions.get_session, "a") == created
    assert store_db.read_sync(sessions.get_session, "nope") is None
    with pytest.raises(NotFound, match="Session not found"):
        store_db.read_sync(sessions.require_session, "nope")
    with pytest.raises(Conflict, match="Session already exists"):
        store_db.write_sync(sessions.create_session, "a")
    with pytest.raises(Conflict, match="taken"):
        store_db.write_sync(sessions.create_session, "a", duplicate_detail="taken")
    with pytest.raises(NotFound, match="Parent session not found"):
        store_db.write_sync(sessions.create_session, "b", parent_session_id="ghost")
    child = store_db.write_sync(sessions.create_session, "b", parent_session_id="a")
    assert child.parent_session_id == "a"
    assert [(t, s) for _, t, s in log(store_db)] == [("session_created", "a"), ("session_created", "b")]


def test_list_is_newest_first_in_byte_order_with_filter_and_limit(store_db):
    for session_id in ("a", "B", "_c", "é"):
        store_db.write_sync(sessions.create_session, session_id)
    # One creation time for all: the ids decide, in byte order (as SQLite compares text).
    same_time = "UPDATE sessions SET created_at = '2025-01-01T00:00:00.000000+00:00'"
    store_db.write_sync(lambda conn: conn.execute(same_time))
    store_db.write_sync(sessions.create_session, "newest")
    store_db.write_sync(sessions.update_session, "B", status="running")
    listed = [s.session_id for s in store_db.read_sync(sessions.list_sessions)]
    assert listed == ["newest", "B", "_c", "a", "é"]
    assert [s.session_id for s in store_db.read_sync(sessions.list_sessions, "pending", 2)] == ["newest", "_c"]
    assert [s.session_id for s in store_db.read_sync(sessions.list_sessions, "running")] == ["B"]
    body = decoded(store_db.read_sync(sessions.list_sessions_json, None, 1))
    assert [s["session_id"] for s in body["sessions"]] == ["newest"]
    assert list(body["sessions"][0]) == list(sessions.Session.__struct_fields__)


def test_updates_bind_and_metadata(store_db):
    store_db.write_sync(sessions.create_session, "a")
    with pytest.raises(NotFound):
        store_db.write_sync(sessions.update_session, "ghost", status="running")
    unchanged = store_db.write_sync(sessions.update_session, "a", agent_name=None)
    assert unchanged.agent_name is None
    patched = store_db.write_sync(sessions.update_metadata, "a", agent_name="x", hostname=None)
    assert (patched.agent_name, patched.hostname) == ("x", None)
    bound = store_db.write_sync(sessions.bind_session, "a", "exec-1", "host", "claude", "/p")
    assert (bound.status, bound.executor_session_id, bound.hostname, bound.executor_type, bound.project_dir) == (
        "running", "exec-1", "host", "claude", "/p")
    assert [t for _, t, _ in log(store_db)] == ["session_created", "session_updated", "session_updated"]


def test_delete_takes_events_runs_and_changes_and_leaves_children(store_db):
    store_db.write_sync(sessions.create_session, "parent")
    store_db.write_sync(sessions.create_session, "child", parent_session_id="parent")
    for _ in range(3):
        store_db.write_sync(events.append_event, "parent", ev("parent"))
    assert store_db.write_sync(sessions.delete_session, "parent") == 3
    assert store_db.read_sync(sessions.get_session, "parent") is None
    assert store_db.read_sync(sessions.get_session, "child").parent_session_id is None
    assert [(t, s) for _, t, s in log(store_db)] == [("session_created", "child"), ("session_deleted", "parent")]
    assert store_db.read_sync(changes.max_deleted) == 5  # the last event's cursor
    with pytest.raises(NotFound):
        store_db.write_sync(sessions.delete_session, "parent")


def test_result_is_the_first_text_block_of_the_newest_assistant_message(store_db):
    store_db.write_sync(sessions.create_session, "s")
    with pytest.raises(Rejected, match="Session not finished"):
        store_db.read_sync(sessions.session_result, "s")
    store_db.write_sync(sessions.update_session, "s", status="finished")
    with pytest.raises(NotFound, match="No result found"):
        store_db.read_sync(sessions.session_result, "s")
    def message(timestamp, content, role="assistant"):
        store_db.write_sync(events.append_event, "s", ev("s", "message", timestamp, role=role, content=content))

    message("2025-01-02", [{"text": "older"}])
    message("2025-01-03", [{"text": "new\u0000st"}, {"text": "second"}])
    message("2025-01-04", [{"text": "u"}], role="user")
    assert store_db.read_sync(sessions.session_result, "s") == "new\u0000st"
    message("2025-01-05", [{"text": 7}])
    with pytest.raises(NotFound, match="No result found"):
        store_db.read_sync(sessions.session_result, "s")


# -- events -------------------------------------------------------------------------------


def test_append_checks_the_session_and_a_stop_finishes_it(store_db):
    with pytest.raises(NotFound):
        store_db.write_sync(events.append_event, "ghost", ev("ghost"))
    store_db.write_sync(sessions.create_session, "s")
    with pytest.raises(Rejected, match="must match"):
        store_db.write_sync(events.append_event, "s", ev("other"))
    event_id, finished = store_db.write_sync(events.append_event, "s", ev("s"))
    assert finished is None
    stop_id, finished = store_db.write_sync(events.append_event, "s", ev("s", "session_stop"))
    assert finished.status == "finished" and stop_id > event_id
    # The session's update is announced just before the event that caused it.
    assert [(c, t) for c, t, _ in log(store_db)][-3:] == [(event_id, "event"), (stop_id - 1, "session_updated"),
                                                          (stop_id, "event")]


def test_legacy_events_create_revive_and_finish(store_db):
    with pytest.raises(NotFound):
        store_db.write_sync(events.append_legacy_event, ev("s"))
    store_db.write_sync(events.append_legacy_event, ev("s", "session_start"))
    assert store_db.read_sync(sessions.get_session, "s").status == "running"
    store_db.write_sync(events.append_legacy_event, ev("s", "session_stop"))
    assert store_db.read_sync(sessions.get_session, "s").status == "finished"
    store_db.write_sync(events.append_legacy_event, ev("s", "session_start"))
    assert store_db.read_sync(sessions.get_session, "s").status == "running"
    assert [t for _, t, _ in log(store_db)] == ["event", "event", "event"]  # sessions never announced here


def test_event_lists_keep_json_as_sent_in_their_orders(store_db):
    assert store_db.read_sync(events.session_events_json, "s") is None
    store_db.write_sync(sessions.create_session, "s")
    sent = {"b": [1, 2.5, None, True, {"ü": "\u0000"}], "a": ""}
    first, _ = store_db.write_sync(events.append_event, "s", ev("s", timestamp="2025-01-02", tool_input=sent))
    second, _ = store_db.write_sync(events.append_event, "s", ev("s", timestamp="2025-01-01", tool_output=0,
                                                                 exit_code=2**63 - 1, content=[]))
    whole = store_db.read_sync(events.session_events_json, "s")
    assert [e["id"] for e in decoded(whole)["events"]] == [second, first]  # by timestamp
    assert b'"tool_input":{"b":[1,2.5,null,true,{"\xc3\xbc":"\\u0000"}],"a":""}' in whole
    assert b'"tool_output":0,' in whole and b'"content":[]}' in whole
    assert decoded(whole)["events"][0]["exit_code"] == 2**63 - 1
    page = decoded(store_db.read_sync(events.events_page_json, "s", None, 1, True))
    assert [e["id"] for e in page["events"]] == [first]  # by id
    assert decoded(store_db.read_sync(events.events_page_json, "s", first, None, True))["events"][0]["id"] == second
    assert decoded(store_db.read_sync(events.events_page_json, "ghost", 0, 10, False)) == {"events": []}
    with pytest.raises(NotFound):
        store_db.read_sync(events.events_page_json, "ghost", 0, 10, True)


# -- the change log -----------------------------------------------------------------------


def test_page_reads_the_log_back_bounded_by_cursor_session_and_bytes(store_db):
    assert store_db.read_sync(changes.newest) == 0
    store_db.write_sync(sessions.create_session, "a")
    store_db.write_sync(sessions.create_session, "b")
    event_id, _ = store_db.write_sync(events.append_event, "a", ev("a", tool_input={"x": 1}))
    store_db.write_sync(lambda conn: changes.record(conn, "run_failed", "b", {"run_id": "r", "error": None}))
    newest = store_db.read_sync(changes.newest)
    assert newest == 4
    page = store_db.read_sync(changes.page, 0, newest, None, 1 << 20)
    assert page.complete and page.max_deleted == 0
    assert [(c.cursor, c.type, c.session_id) for c in page.changes] == [
        (1, "session_created", "a"), (2, "session_created", "b"), (event_id, "event", "a"), (4, "run_failed", "b")]
    assert page.changes[2].payload == b'{"data":' + msgspec.json.encode(ev("a", tool_input={"x": 1})) + b"}"
    assert page.changes[3].payload == b'{"run_id":"r","error":null}'
    only_a = store_db.read_sync(changes.page, 1, newest, "a", 1 << 20)
    assert [c.cursor for c in only_a.changes] == [event_id]
    small = store_db.read_sync(changes.page, 0, 3, None, 1)  # at least one change, however small the bound
    assert ([c.cursor for c in small.changes], small.complete) == ([1], False)


def test_counts_by_status(store_db):
    assert store_db.read_sync(stats.status_counts) == {"runs": {}, "runners": {}}
    store_db.write_sync(lambda conn: conn.execute(
        "INSERT INTO runners (runner_id, registered_at, last_heartbeat, hostname, project_dir, executor_type)"
        " VALUES ('r', 't', 't', 'h', '/p', 'x')"))
    assert store_db.read_sync(stats.status_counts) == {"runs": {}, "runners": {"online": 1}}


def test_writes_colliding_on_one_row_all_commit(store_db):
    """PostgreSQL runs writes side by side: those that lose a conflict on the one row run again
    (taking turns), and every one of them commits, as with SQLite's single writer."""
    store_db.write_sync(sessions.create_session, "hot")
    names = [f"{t}-{i}" for t in range(8) for i in range(25)]

    def patch(t: int) -> None:
        for name in names[t * 25:(t + 1) * 25]:
            assert store_db.write_sync(sessions.update_metadata, "hot", agent_name=name).agent_name == name

    threads = [threading.Thread(target=patch, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    updates = [t for _, t, _ in log(store_db)].count("session_updated")
    assert updates == len(names)
    assert store_db.read_sync(sessions.get_session, "hot").agent_name in names
