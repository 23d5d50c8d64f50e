"""POST /hooks/claude-code over a real server: every hook event of Claude Code's hooks reference,
as recorded-shape payloads (tests/fixtures/claude_code), becomes one event of its session, kept
whole, broadcast and read back exactly; tool calls pair by tool_use_id."""

import json
from pathlib import Path

import msgspec
import pytest
import requests
from jsonschema import Draft202012Validator
from websockets.sync.client import connect

from test_live import EVENT_DATA_KEYS
from test_sessions import create

FIXTURES = Path(__file__).parent / "fixtures" / "claude_code"
HOOKS = sorted(FIXTURES.glob("[0-9][0-9]_*.json"))
ANSWER = Draft202012Validator(json.loads((FIXTURES / "hook_response.schema.json").read_text()))
CLAUDE_SESSION = "5f0c2a6e-4d7b-4c1a-9b7e-2f3d5a6b7c8d"

# The event each hook becomes; None: the hook's own name.
EVENT_TYPES = {
    "SessionStart": "session_start", "SessionEnd": "session_stop", "UserPromptSubmit": "message",
    "PreToolUse": "pre_tool", "PostToolUse": "post_tool", "PostToolUseFailure": "post_tool", "Stop": "message",
}
KNOWN = {*EVENT_DATA_KEYS, "id"}


def post_hook(server, body: bytes, **headers) -> requests.Response:
    return requests.post(server.url + "/hooks/claude-code", data=body, headers=headers, timeout=30)


def recv(ws) -> tuple[dict, str]:
    text = ws.recv(timeout=10)
    return json.loads(text), text


def expected_extra(payload: dict) -> dict:
    skip = {"tool_response"} if payload["hook_event_name"] in ("PostToolUse", "PostToolUseFailure") else set()
    return {key: value for key, value in payload.items() if key not in KNOWN | skip}


def test_documented_hook_fixtures_cover_every_event():
    names = {json.loads(path.read_text())["hook_event_name"] for path in HOOKS}
    assert names == {
        "SessionStart", "SessionEnd", "UserPromptSubmit", "PreToolUse", "PostToolUse", "PostToolUseFailure",
        "PermissionRequest", "Notification", "Stop", "SubagentStart", "SubagentStop", "PreCompact", "SomeFutureEvent",
    }


def test_every_hook_event_becomes_one_event_kept_whole_and_broadcast_exactly(server):
    with connect(server.ws_url + "/ws") as ws:
        recv(ws)  # init
        frames = []
        for path in HOOKS:
            r = post_hook(server, path.read_bytes())
            assert r.status_code == 200 and r.json() == {}, (path.name, r.text)
            ANSWER.validate(r.json())
            payload = json.loads(path.read_text())
            if payload["hook_event_name"] == "SessionStart":
                created, _ = recv(ws)
                assert created["type"] == "session_created"
                assert created["session"] | {"created_at": None} == {
                    "session_id": CLAUDE_SESSION, "status": "running", "created_at": None,
                    "project_dir": "/home/dev/shop", "agent_name": None, "last_resumed_at": None,
                    "parent_session_id": None, "execution_mode": "sync", "executor_session_id": None,
                    "executor_type": None, "hostname": None,
                }
            if payload["hook_event_name"] == "SessionEnd":  # announced before its event
                updated, _ = recv(ws)
                assert updated["type"] == "session_updated" and updated["session"]["status"] == "finished"
            frame, text = recv(ws)
            assert frame["type"] == "event", frame
            frames.append((payload, path.read_text(), frame["data"], text))

    stored = server.get(f"/sessions/{CLAUDE_SESSION}/events").json()["events"]
    assert len(stored) == len(HOOKS)
    for (payload, raw, data, text), row in zip(frames, stored, strict=True):
        name = payload["hook_event_name"]
        assert data["event_type"] == EVENT_TYPES.get(name, name)
        assert data["session_id"] == CLAUDE_SESSION
        # The known keys first, then the rest of the hook's payload in the order sent.
        extra = expected_extra(payload)
        assert list(data) == [*EVENT_DATA_KEYS, *extra]
        assert {key: data[key] for key in extra} == extra
        assert row == {"id": row["id"], **data}  # read back exactly as broadcast
        for key in ("tool_name", "tool_input", "error", "reason"):
            assert data[key] == payload.get(key)
        assert data["tool_output"] == payload.get("tool_response")
        # Values are kept byte for byte: the fixture's own spelling (indentation included).
        for key, value in msgspec.json.decode(raw.encode(), type=dict[str, msgspec.Raw]).items():
            if key in extra:
                assert f"\"{key}\":{bytes(value).decode()}" in text, key

    by_type = {}
    for row in stored:
        by_type.setdefault(row["event_type"], []).append(row)
    prompt, answer = by_type["message"]
    assert (prompt["role"], prompt["content"]) == ("user", [{"type": "text", "text": "Add a /health endpoint and run the tests"}])
    assert (answer["role"], answer["content"]) == ("assistant", [{"type": "text", "text": "Added GET /health; all 42 tests pass."}])
    assert by_type["SomeFutureEvent"][0]["detail"] == {"nested": [1, 2.5, None]}
    assert by_type["session_stop"][0]["reason"] == "prompt_input_exit"

    # A tool call's pre and post events pair by tool_use_id; a failure is its post, with the error.
    pairs = {}
    for row in stored:
        if row["event_type"] in ("pre_tool", "post_tool"):
            pairs.setdefault(row["tool_use_id"], []).append(row["event_type"])
    assert pairs == {tool_use_id: ["pre_tool", "post_tool"] for tool_use_id in
                     ("toolu_01A9xq", "toolu_02Bk7w", "toolu_03Cm2e", "toolu_04Dn5r")}
    failed = [row for row in stored if row.get("tool_use_id") == "toolu_02Bk7w" and row["event_type"] == "post_tool"]
    assert failed[0]["error"] == "Command exited with non-zero status code 1" and failed[0]["is_interrupt"] is False

    # The subagent's events carry its ids: a session's agent tree can be drawn from them.
    subagent = [row["hook_event_name"] for row in stored if row.get("agent_id") == "a8a5aea3b68767861"]
    assert subagent == ["SubagentStart", "PreToolUse", "PostToolUse", "SubagentStop"]

    session = server.get(f"/sessions/{CLAUDE_SESSION}").json()["session"]
    assert session["status"] == "finished"
    assert server.get(f"/sessions/{CLAUDE_SESSION}/result").json() == {"result": "Added GET /health; all 42 tests pass."}
    assert [s["session_id"] for s in server.get("/sessions").json()["sessions"]] == [CLAUDE_SESSION]


def test_hooks_of_a_session_a_runner_started_go_to_that_session(server):
    create(server, "ses_run")
    bind = {"executor_session_id": CLAUDE_SESSION, "hostname": "h", "executor_type": "claude-code"}
    assert server.post("/sessions/ses_run/bind", bind).status_code == 200
    assert post_hook(server, (FIXTURES / "03_pre_tool_use.json").read_bytes()).json() == {}
    (row,) = server.get("/sessions/ses_run/events").json()["events"]
    assert row["event_type"] == "pre_tool" and row["session_id"] == "ses_run" and row["tool_use_id"] == "toolu_01A9xq"
    assert server.get(f"/sessions/{CLAUDE_SESSION}").status_code == 404  # no second session


def test_a_new_start_revives_a_finished_session(server):
    start = (FIXTURES / "01_session_start.json").read_bytes()
    post_hook(server, start)
    post_hook(server, (FIXTURES / "18_session_end.json").read_bytes())
    assert server.get(f"/sessions/{CLAUDE_SESSION}/status").json() == {"status": "finished"}
    post_hook(server, start.replace(b'"startup"', b'"resume"'))
    assert server.get(f"/sessions/{CLAUDE_SESSION}/status").json() == {"status": "running"}


@pytest.mark.parametrize("body, where", [
    (b'{"hook_event_name": "Stop"}', ["body", "session_id"]),
    (b'{"session_id": "s"}', ["body", "hook_event_name"]),
    (b'{"session_id": "s", "hook_event_name": "PreToolUse", "tool_input": "ls"}', ["body", "tool_input"]),
    (b'[1, 2]', ["body"]),
    (b'{"session_id": ', ["body"]),
])
def test_bad_hook_input_is_a_clear_422(server, body, where):
    r = post_hook(server, body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert r.json()["detail"][0]["loc"] == where
    assert server.get("/sessions").json() == {"sessions": []}


def test_hooks_under_the_bearer_token(make_server):
    srv = make_server(api_token="hook-token-3f9a")
    body = (FIXTURES / "01_session_start.json").read_bytes()
    r = post_hook(srv, body)
    assert r.status_code == 401 and r.json() == {"detail": "Not authenticated"}
    assert post_hook(srv, body, Authorization="Bearer wrong").status_code == 401
    r = post_hook(srv, body, Authorization="Bearer hook-token-3f9a")
    assert r.status_code == 200 and r.json() == {}
