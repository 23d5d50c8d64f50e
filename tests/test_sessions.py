"""Sessions and events over HTTP, one test or more per contract row."""

import re
import threading

import pytest
import requests

SESSION_KEYS = [
    "session_id", "status", "created_at", "project_dir", "agent_name", "last_resumed_at",
    "parent_session_id", "execution_mode", "executor_session_id", "executor_type", "hostname",
]
EVENT_KEYS = [
    "id", "session_id", "event_type", "timestamp", "tool_name", "tool_input", "tool_output",
    "error", "exit_code", "reason", "role", "content",
]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


def event(session_id, event_type="post_tool", ts="2025-01-01T00:00:00.000000+00:00", **fields):
    return {"event_type": event_type, "session_id": session_id, "timestamp": ts, **fields}


def assistant(session_id, text, ts):
    return event(session_id, "message", ts, role="assistant", content=[{"type": "text", "text": text}])


def create(server, session_id, **fields):
    r = server.post("/sessions", {"session_id": session_id, **fields})
    assert r.status_code == 200, r.text
    return r.json()["session"]


# -- POST/GET /sessions -----------------------------------------------------------------


def test_create_session_shape(server):
    r = server.post("/sessions", {"session_id": "ses_1", "project_dir": "/p", "agent_name": "a",
                                  "execution_mode": "async_poll", "unknown": 1})
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is True
    session = body["session"]
    assert list(session) == SESSION_KEYS
    assert session["status"] == "pending"
    assert TS.match(session["created_at"])
    assert (session["project_dir"], session["agent_name"]) == ("/p", "a")
    assert session["execution_mode"] == "async_poll"


def test_create_session_errors(server):
    create(server, "dup")
    r = server.post("/sessions", {"session_id": "dup"})
    assert (r.status_code, r.json()) == (409, {"detail": "Session already exists"})
    r = server.post("/sessions", {"session_id": "child", "parent_session_id": "ghost"})
    assert r.status_code == 404 and r.json() == {"detail": "Parent session not found"}
    for bad in ({}, {"session_id": 5}, {"session_id": "x", "execution_mode": "bogus"}):
        r = server.post("/sessions", bad)
        assert r.status_code == 422
        assert all("loc" in item and "msg" in item for item in r.json()["detail"])
    r = server.post("/sessions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    # nothing was written by the rejected requests, and the server keeps serving
    assert [s["session_id"] for s in server.get("/sessions").json()["sessions"]] == ["dup"]


def test_body_parsed_without_content_type(server):
    r = server.post("/sessions", data=b'{"session_id": "plain"}')
    assert r.status_code == 200 and r.json()["session"]["session_id"] == "plain"


def test_create_with_parent(server):
    create(server, "parent")
    assert create(server, "kid", parent_session_id="parent")["parent_session_id"] == "parent"


def test_list_sessions_order_and_filters(server):
    for sid in ("s1", "s2", "s3"):
        create(server, sid)
    server.post("/sessions/s2/bind", {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
    listed = server.get("/sessions").json()["sessions"]
    assert [s["session_id"] for s in listed] == ["s3", "s2", "s1"]
    assert all(list(s) == SESSION_KEYS for s in listed)
    assert [s["session_id"] for s in server.get("/sessions?status=running").json()["sessions"]] == ["s2"]
    assert server.get("/sessions?status=unknown").json() == {"sessions": []}
    assert [s["session_id"] for s in server.get("/sessions?limit=2").json()["sessions"]] == ["s3", "s2"]
    for bad in ("0", "x", "-1"):
        assert server.get(f"/sessions?limit={bad}").status_code == 422


def test_get_session_status_affinity(server):
    create(server, "s")
    assert server.get("/sessions/s").json()["session"]["session_id"] == "s"
    assert server.get("/sessions/nope").json() == {"detail": "Session not found"}
    assert server.get("/sessions/nope").status_code == 404
    assert server.get("/sessions/s/status").json() == {"status": "pending"}
    r = server.get("/sessions/nope/status")
    assert (r.status_code, r.json()) == (200, {"status": "not_existent"})
    assert server.get("/sessions/s/affinity").json() == {"affinity": {
        "session_id": "s", "executor_session_id": None, "hostname": None, "project_dir": None,
        "executor_type": None}}
    assert server.get("/sessions/nope/affinity").status_code == 404


# -- bind, metadata -----------------------------------------------------------------------


def test_bind_sets_executor_and_running_from_any_status(server):
    create(server, "s", project_dir="/old")
    server.post("/sessions/s/events", event("s", "session_stop"))
    r = server.post("/sessions/s/bind", {"executor_session_id": "uuid", "hostname": "h1",
                                         "executor_type": "claude-code"})
    assert r.status_code == 200
    session = r.json()["session"]
    assert (session["status"], session["executor_session_id"], session["hostname"]) == ("running", "uuid", "h1")
    assert session["project_dir"] == "/old"
    r = server.post("/sessions/s/bind", {"executor_session_id": "u2", "hostname": "h2",
                                         "executor_type": "t", "project_dir": "/new"})
    assert r.json()["session"]["project_dir"] == "/new"
    assert server.get("/sessions/s/affinity").json()["affinity"] == {
        "session_id": "s", "executor_session_id": "u2", "hostname": "h2", "project_dir": "/new",
        "executor_type": "t"}
    assert server.post("/sessions/nope/bind", {"executor_session_id": "u", "hostname": "h",
                                               "executor_type": "t"}).status_code == 404
    assert server.post("/sessions/s/bind", {"hostname": "h"}).status_code == 422


def test_metadata_patch(server):
    create(server, "s", agent_name="a")
    r = server.patch("/sessions/s/metadata", {"last_resumed_at": "2025-02-02T00:00:00+00:00", "agent_name": None})
    assert r.status_code == 200
    session = r.json()["session"]
    assert session["last_resumed_at"] == "2025-02-02T00:00:00+00:00"
    assert session["agent_name"] == "a"  # null = unchanged
    assert server.patch("/sessions/s/metadata", {}).json()["ok"] is True
    assert server.patch("/sessions/nope/metadata", {}).status_code == 404
    assert server.patch("/sessions/s/metadata", {"hostname": 3}).status_code == 422


# -- delete ---------------------------------------------------------------------------


def test_delete_cascades_and_orphans_children(server):
    create(server, "parent")
    create(server, "kid", parent_session_id="parent")
    for i in range(3):
        assert server.post("/sessions/parent/events", event("parent", ts=f"t{i}")).status_code == 200
    r = server.delete("/sessions/parent")
    assert r.json() == {"ok": True, "session_id": "parent", "deleted": {"session": True, "events_count": 3}}
    assert server.get("/sessions/parent").status_code == 404
    assert server.get("/events/parent").json() == {"events": []}
    assert server.get("/sessions/kid").json()["session"]["parent_session_id"] is None
    r = server.delete("/sessions/parent")
    assert (r.status_code, r.json()) == (404, {"detail": "Session not found"})


# -- events ---------------------------------------------------------------------------


def test_post_event_and_read_back_faithfully(server):
    create(server, "s")
    sent = event("s", tool_name="Bash", tool_input={}, tool_output=False, error="", exit_code=0,
                 reason="", role="user", content=[])
    assert server.post("/sessions/s/events", sent).json() == {"ok": True}
    nested = event("s", ts="2025-01-02", tool_input={"cmd": "ls", "n": [1, {"x": None}]}, tool_output="text")
    server.post("/sessions/s/events", nested)
    rows = server.get("/sessions/s/events").json()["events"]
    assert [list(r) for r in rows] == [EVENT_KEYS, EVENT_KEYS]
    first = rows[0]
    assert isinstance(first["id"], int)
    assert {k: first[k] for k in sent} == sent  # falsy values come back as sent
    assert rows[1]["tool_input"] == {"cmd": "ls", "n": [1, {"x": None}]}
    assert rows[1]["tool_output"] == "text" and rows[1]["content"] is None
    assert server.get("/events/s").json() == {"events": rows}


def test_post_event_errors_in_contract_order(server):
    create(server, "s")
    # unknown session first, even with a broken body
    r = server.post("/sessions/nope/events", {"bad": True})
    assert (r.status_code, r.json()) == (404, {"detail": "Session not found"})
    r = server.post("/sessions/nope/events", event("other"))
    assert r.status_code == 404
    r = server.post("/sessions/s/events", event("other"))
    assert (r.status_code, r.json()) == (400, {"detail": "Event session_id must match URL session_id"})
    for bad in ({"session_id": "s"}, event("s", exit_code="0"), event("s", tool_input=[1]), event("s", content={})):
        assert server.post("/sessions/s/events", bad).status_code == 422
    assert server.get("/sessions/s/events").json() == {"events": []}
    assert server.get("/sessions/nope/events").status_code == 404


def test_events_ordered_by_timestamp_then_id(server):
    create(server, "s")
    for ts in ("t3", "t1", "t2", "t1"):
        server.post("/sessions/s/events", event("s", ts=ts, reason=ts))
    rows = server.get("/sessions/s/events").json()["events"]
    assert [(r["timestamp"], r["id"]) for r in rows] == sorted((r["timestamp"], r["id"]) for r in rows)


def test_session_stop_finishes_but_session_start_does_not_change_status(server):
    create(server, "s")
    server.post("/sessions/s/events", event("s", "session_start"))
    assert server.get("/sessions/s/status").json() == {"status": "pending"}
    server.post("/sessions/s/events", event("s", "session_stop", exit_code=0, reason="completed"))
    assert server.get("/sessions/s/status").json() == {"status": "finished"}


def test_five_thousand_events_all_returned(server):
    create(server, "big")

    def post_many(start):
        with requests.Session() as http:  # keep-alive
            for i in range(start, 5000, 8):
                body = event("big", ts=f"{i:06d}", tool_input={"i": i})
                assert http.post(server.url + "/sessions/big/events", json=body, timeout=30).status_code == 200

    threads = [threading.Thread(target=post_many, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = server.get("/sessions/big/events").json()["events"]
    assert [r["tool_input"]["i"] for r in rows] == list(range(5000))


def test_paging_with_after_and_limit_returns_each_event_once(server):
    create(server, "s")
    create(server, "other")
    for i in range(25):
        server.post("/sessions/s/events", event("s", ts=f"{25 - i:03d}", tool_input={"i": i}))
        server.post("/sessions/other/events", event("other"))
    seen, after = [], 0
    for _ in range(10):
        page = server.get(f"/sessions/s/events?after={after}&limit=7").json()["events"]
        if not page:
            break
        assert len(page) <= 7
        assert [r["id"] for r in page] == sorted(r["id"] for r in page)
        seen += [r["tool_input"]["i"] for r in page]
        after = page[-1]["id"]
    assert seen == list(range(25))  # ascending by id, all exactly once
    assert len(server.get(f"/events/s?after={after}").json()["events"]) == 0
    first_id = server.get("/sessions/s/events?limit=1").json()["events"][0]["id"]
    everything_after_first = server.get(f"/sessions/s/events?after={first_id}").json()["events"]
    assert [r["tool_input"]["i"] for r in everything_after_first] == list(range(1, 25))
    for bad in ("limit=0", "limit=1001", "limit=x", "after=-1", "after=y"):
        r = server.get(f"/sessions/s/events?{bad}")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "query"


def test_legacy_events(server):
    # session_start upserts a running session with created_at = the event's timestamp
    r = server.post("/events", event("legacy", "session_start", ts="2025-03-03T00:00:00+00:00"))
    assert r.json() == {"ok": True}
    session = server.get("/sessions/legacy").json()["session"]
    assert (session["status"], session["created_at"], session["project_dir"]) == (
        "running", "2025-03-03T00:00:00+00:00", None)
    server.post("/events", event("legacy", "session_stop"))
    assert server.get("/sessions/legacy/status").json() == {"status": "finished"}
    server.post("/events", event("legacy", "session_start", ts="2030-01-01"))
    session = server.get("/sessions/legacy").json()["session"]
    assert (session["status"], session["created_at"]) == ("running", "2025-03-03T00:00:00+00:00")
    assert len(server.get("/events/legacy").json()["events"]) == 3
    r = server.post("/events", event("ghost"))
    assert (r.status_code, r.json()) == (404, {"detail": "Session not found"})
    assert server.post("/events", {"event_type": "x"}).status_code == 422
    assert server.get("/events/ghost").json() == {"events": []}


# -- result -----------------------------------------------------------------------------


def test_result_rule(server):
    create(server, "s")
    server.post("/sessions/s/events", assistant("s", "early", "2025-01-01T00:00:01+00:00"))
    server.post("/sessions/s/events", assistant("s", "latest", "2025-01-01T00:00:09+00:00"))
    server.post("/sessions/s/events", assistant("s", "posted last, older", "2025-01-01T00:00:05+00:00"))
    server.post("/sessions/s/events", event("s", "message", "2025-01-01T00:00:10+00:00", role="user",
                                             content=[{"type": "text", "text": "user text"}]))
    r = server.get("/sessions/s/result")
    assert (r.status_code, r.json()) == (400, {"detail": "Session not finished"})
    server.post("/sessions/s/events", event("s", "session_stop"))
    assert server.get("/sessions/s/result").json() == {"result": "latest"}
    assert server.get("/sessions/nope/result").status_code == 404


@pytest.mark.parametrize("content", [[], [{"type": "tool_use", "id": "x"}], None])
def test_result_not_found_without_text(server, content):
    create(server, "s")
    server.post("/sessions/s/events", event("s", "message", "t1", role="assistant", content=content))
    server.post("/sessions/s/events", event("s", "session_stop"))
    r = server.get("/sessions/s/result")
    assert (r.status_code, r.json()) == (404, {"detail": "No result found"})


def test_full_list_follows_every_kind_of_session_change(server):
    def listed():
        return {s["session_id"]: s["status"] for s in server.get("/sessions").json()["sessions"]}

    create(server, "a")
    assert listed() == {"a": "pending"}
    server.post("/sessions/a/bind", {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
    assert listed() == {"a": "running"}
    server.post("/events", event("b", "session_start"))
    assert listed() == {"a": "running", "b": "running"}
    server.post("/sessions/a/events", event("a", "session_stop"))
    assert listed() == {"a": "finished", "b": "running"}
    server.delete("/sessions/b")
    assert listed() == {"a": "finished"}
