"""Approvals end to end on a real server: a hook request held until a person decides over the
API, the default on timeout, many at once, a client that hangs up, a shutdown, a restart, and
approvals requested by other clients; the answers Claude Code reads fit its documented format."""

import concurrent.futures
import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from jsonschema import Draft202012Validator
from websockets.sync.client import connect

from coordinator_core.settings import Settings, SettingsError
from runner_client import wait_for
from store.models import ApprovalRule
from server_process import ServerProcess
from test_sessions import create

FIXTURES = Path(__file__).parent / "fixtures" / "claude_code"
ANSWER = Draft202012Validator(json.loads((FIXTURES / "hook_response.schema.json").read_text()))
PRE_TOOL = json.loads((FIXTURES / "05_pre_tool_use_risky.json").read_text())
PERMISSION = json.loads((FIXTURES / "07_permission_request.json").read_text())
BASH = (ApprovalRule(tool="Bash"),)
APPROVAL_KEYS = [
    "approval_id", "session_id", "source", "hook_event_name", "tool_name", "tool_input", "tool_use_id", "agent_id",
    "agent_type", "requested_at", "expires_at", "status", "decision", "reason", "decided_by", "decided_at",
]


def pending(server) -> list[dict]:
    r = server.get("/approvals?status=pending")
    assert r.status_code == 200
    return r.json()["approvals"]


def hold(server, payload: dict) -> concurrent.futures.Future:
    """Post a hook in the background; the future is its answer."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(requests.post, server.url + "/hooks/claude-code", json=payload, timeout=60)
    pool.shutdown(wait=False)
    return future


def answered(future) -> dict:
    r = future.result(timeout=30)
    assert r.status_code == 200, r.text
    ANSWER.validate(r.json())
    return r.json()


def test_pre_tool_use_held_until_a_decision_over_the_api(make_server):
    srv = make_server(approval_rules=BASH)
    with connect(srv.ws_url + "/ws") as ws:
        json.loads(ws.recv(timeout=10))  # init
        future = hold(srv, PRE_TOOL)
        (approval,) = wait_for(lambda: pending(srv), "approval pending")
        assert list(approval) == APPROVAL_KEYS
        assert approval | {"approval_id": None, "requested_at": None, "expires_at": None} == {
            "approval_id": None, "session_id": PRE_TOOL["session_id"], "source": "claude_code",
            "hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": PRE_TOOL["tool_input"],
            "tool_use_id": "toolu_02Bk7w", "agent_id": None, "agent_type": None, "requested_at": None,
            "expires_at": None, "status": "pending", "decision": None, "reason": None, "decided_by": None,
            "decided_at": None,
        }
        assert not future.done()
        approval_id = approval["approval_id"]
        assert srv.get(f"/approvals/{approval_id}").json() == {"approval": approval}

        r = srv.post(f"/approvals/{approval_id}", {"decision": "deny", "reason": "Not on a Friday"})
        assert r.status_code == 200
        decided = r.json()["approval"]
        assert (decided["status"], decided["decision"], decided["reason"], decided["decided_by"]) == (
            "decided", "deny", "Not on a Friday", "api")
        assert decided["decided_at"] >= decided["requested_at"]
        assert answered(future) == {"hookSpecificOutput": {
            "hookEventName": "PreToolUse", "permissionDecision": "deny", "permissionDecisionReason": "Not on a Friday",
        }}
        # Deciding again is refused, and changes nothing.
        r = srv.post(f"/approvals/{approval_id}", {"decision": "allow"})
        assert r.status_code == 409 and r.json() == {"detail": "Approval already decided"}
        assert srv.get(f"/approvals/{approval_id}").json() == {"approval": decided}

        # Broadcast through the change log, after the hook's own event, with the session's id.
        types = []
        while len(types) < 4:
            frame = json.loads(ws.recv(timeout=10))
            types.append(frame["type"])
            if frame["type"] == "approval_requested":
                assert frame["approval"] == approval
            if frame["type"] == "approval_decided":
                assert frame["approval"] == decided
        assert types == ["session_created", "event", "approval_requested", "approval_decided"]
    assert pending(srv) == []
    assert srv.get("/approvals").json() == {"approvals": [decided]}
    assert srv.get(f"/approvals?session_id={PRE_TOOL['session_id']}&status=decided").json() == {"approvals": [decided]}


@pytest.mark.parametrize("decision, expected", [
    ("allow", {"behavior": "allow"}),
    ("deny", {"behavior": "deny", "message": "Denied by api through the agent coordinator"}),
])
def test_permission_request_answered_in_its_format(make_server, decision, expected):
    srv = make_server(approval_rules=BASH)
    future = hold(srv, PERMISSION)
    (approval,) = wait_for(lambda: pending(srv), "approval pending")
    assert approval["hook_event_name"] == "PermissionRequest" and approval["tool_use_id"] is None
    assert srv.post(f"/approvals/{approval['approval_id']}", {"decision": decision}).status_code == 200
    assert answered(future) == {"hookSpecificOutput": {"hookEventName": "PermissionRequest", "decision": expected}}


def test_calls_no_rule_holds_get_no_decision_at_once(make_server):
    rules = (ApprovalRule(tool="Bash", project_dir="/srv/*"), ApprovalRule(tool="Grep", agent="Explo*"))
    srv = make_server(approval_rules=rules)
    for payload in (
        PRE_TOOL,  # cwd /home/dev/shop
        PRE_TOOL | {"tool_name": "Read"},
        json.loads((FIXTURES / "03_pre_tool_use.json").read_text()) | {"tool_name": "Grep"},  # not a subagent
        json.loads((FIXTURES / "04_post_tool_use.json").read_text()) | {"cwd": "/srv/app"},  # not a deciding hook
    ):
        r = requests.post(srv.url + "/hooks/claude-code", json=payload, timeout=10)
        assert r.status_code == 200 and r.json() == {}
    assert srv.get("/approvals").json() == {"approvals": []}
    held = [hold(srv, PRE_TOOL | {"cwd": "/srv/app"}),
            hold(srv, json.loads((FIXTURES / "11_subagent_pre_tool_use.json").read_text()))]
    found = wait_for(lambda: len(pending(srv)) == 2 and pending(srv), "both held")
    assert {a["agent_type"] for a in found} == {None, "Explore"}
    for approval in found:
        srv.post(f"/approvals/{approval['approval_id']}", {"decision": "allow"})
    assert [answered(f)["hookSpecificOutput"]["permissionDecision"] for f in held] == ["allow", "allow"]


@pytest.mark.parametrize("default", ["deny", "allow"])
def test_timeout_applies_the_configured_default_and_records_it(make_server, default):
    srv = make_server(approval_rules=BASH, approval_timeout=0.5, approval_timeout_decision=default)
    answer = answered(hold(srv, PRE_TOOL))
    reason = f"No decision within 0.5 s: {default} by default"
    assert answer == {"hookSpecificOutput": {
        "hookEventName": "PreToolUse", "permissionDecision": default, "permissionDecisionReason": reason,
    }}
    (approval,) = srv.get("/approvals").json()["approvals"]
    assert (approval["status"], approval["decision"], approval["decided_by"], approval["reason"]) == (
        "decided", default, "timeout", reason)


def test_many_pending_at_once_each_gets_its_own_decision(make_server):
    srv = make_server(approval_rules=BASH)
    count = 24
    futures = {
        n: hold(srv, PRE_TOOL | {"tool_input": {"command": f"job {n}"}, "tool_use_id": f"toolu_{n}"})
        for n in range(count)
    }
    found = wait_for(lambda: len(pending(srv)) == count and pending(srv), "all held")
    decisions = {a["approval_id"]: ("allow" if int(a["tool_use_id"][6:]) % 3 else "deny", a["tool_use_id"]) for a in found}
    order = list(decisions)
    random.Random(7).shuffle(order)
    for approval_id in order:
        r = srv.post(f"/approvals/{approval_id}", {"decision": decisions[approval_id][0], "reason": approval_id})
        assert r.status_code == 200
    for approval_id, (decision, tool_use_id) in decisions.items():
        output = answered(futures[int(tool_use_id[6:])])["hookSpecificOutput"]
        assert (output["permissionDecision"], output["permissionDecisionReason"]) == (decision, approval_id)
    assert pending(srv) == []


def test_a_hook_client_that_hangs_up_expires_its_approval(make_server):
    srv = make_server(approval_rules=BASH)
    body = json.dumps(PRE_TOOL).encode()
    with connect(srv.ws_url + "/ws") as ws:
        json.loads(ws.recv(timeout=10))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"POST /hooks/claude-code HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            (approval,) = wait_for(lambda: pending(srv), "approval pending")
        expired = wait_for(lambda: srv.get(f"/approvals/{approval['approval_id']}").json()["approval"]
                             if not pending(srv) else None, "approval expired")
        assert (expired["status"], expired["decision"], expired["decided_by"], expired["reason"]) == (
            "expired", None, None, "The hook request was closed before a decision")
        frames = [json.loads(ws.recv(timeout=10)) for _ in range(4)]
        assert frames[-1] == {"type": "approval_decided", "approval": expired}
    r = srv.post(f"/approvals/{approval['approval_id']}", {"decision": "allow"})
    assert r.status_code == 409 and r.json() == {"detail": "Approval already expired"}


def test_shutdown_hands_held_decisions_back_to_claude_code_at_once(make_server):
    srv = make_server(approval_rules=BASH)
    pre_tool, permission = hold(srv, PRE_TOOL), hold(srv, PERMISSION)
    wait_for(lambda: len(pending(srv)) == 2, "both held")
    started = time.monotonic()
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    assert answered(pre_tool) == {"hookSpecificOutput": {
        "hookEventName": "PreToolUse", "permissionDecision": "ask",
        "permissionDecisionReason": "The coordinator shut down before a decision",
    }}
    assert answered(permission) == {}  # Claude Code shows its own permission dialog
    stopper.join(30)
    assert time.monotonic() - started < 8  # not held up until the graceful shutdown gives up (10 s)


def test_restart_expires_approvals_whose_hook_request_is_gone(tmp_path):
    rules = json.dumps([{"tool": "Bash"}])
    with ServerProcess(tmp_path / "project", APPROVAL_RULES=rules) as srv:
        create(srv, "ses_api")
        api = srv.post("/approvals", {"session_id": "ses_api", "tool_name": "Deploy", "tool_input": {"env": "prod"}})
        api = api.json()["approval"]
        held = hold(srv, PRE_TOOL)
        wait_for(lambda: len(pending(srv)) == 2, "both pending")
        srv.kill()
        with pytest.raises(requests.ConnectionError):
            held.result(timeout=30)
        srv.start()
        approvals = {a["source"]: a for a in srv.get("/approvals").json()["approvals"]}
        assert (approvals["claude_code"]["status"], approvals["claude_code"]["reason"]) == (
            "expired", "The coordinator restarted before a decision")
        # An approval asked for over the API has no request to lose: it can still be decided.
        assert approvals["api"] == api
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            srv.get, f"/approvals/{api['approval_id']}/wait?timeout=20")
        wait_for(lambda: srv.post(f"/approvals/{api['approval_id']}", {"decision": "allow"}).status_code == 200,
                   "decided")
        assert waiting.result(timeout=30).json()["approval"]["decision"] == "allow"
        assert "1 pending approvals expired" in srv.log()


def test_any_client_can_ask_for_an_approval_and_wait(make_server):
    srv = make_server(approval_timeout=30)
    create(srv, "ses_r")
    r = srv.post("/approvals", {"session_id": "ses_r", "tool_name": "Deploy", "tool_input": {"env": "prod"},
                                "tool_use_id": "call_1"})
    assert r.status_code == 200
    approval = r.json()["approval"]
    assert (approval["source"], approval["status"], approval["tool_input"]) == ("api", "pending", {"env": "prod"})
    approval_id = approval["approval_id"]

    r = srv.get(f"/approvals/{approval_id}/wait?timeout=0")  # returns at once: still pending
    assert r.status_code == 200 and r.json() == {"approval": approval}
    waiting = concurrent.futures.ThreadPoolExecutor(1).submit(srv.get, f"/approvals/{approval_id}/wait?timeout=20")
    wait_for(lambda: srv.state.approvals.waiting(approval_id) == 1, "long-poll parked")
    started = time.monotonic()
    srv.post(f"/approvals/{approval_id}", {"decision": "allow", "reason": "go"})
    decided = waiting.result(timeout=30).json()["approval"]
    assert time.monotonic() - started < 5
    assert (decided["status"], decided["decision"], decided["reason"]) == ("decided", "allow", "go")

    assert srv.post("/approvals", {"session_id": "nope", "tool_name": "x"}).json() == {"detail": "Session not found"}
    assert srv.get("/approvals/nope/wait").status_code == 404
    assert srv.get(f"/approvals/{approval_id}/wait?timeout=-1").status_code == 422
    r = srv.post(f"/approvals/{approval_id}", {"decision": "maybe"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "decision"]


def test_api_approval_times_out_with_nobody_waiting(make_server):
    srv = make_server(approval_timeout=0.3)
    create(srv, "ses_t")
    approval_id = srv.post("/approvals", {"session_id": "ses_t", "tool_name": "Deploy"}).json()["approval"]["approval_id"]
    decided = wait_for(lambda: (a := srv.get(f"/approvals/{approval_id}").json()["approval"])["status"] != "pending"
                         and a, "timed out")
    assert (decided["decision"], decided["decided_by"]) == ("deny", "timeout")


def test_approval_settings(tmp_path):
    (tmp_path / "rules.json").write_text("[]")
    rules = '[{"tool": "Bash", "project_dir": "/srv/*"}, {"tool": "mcp__*", "agent": "deploy*"}]'
    settings = Settings.from_env({"APPROVAL_RULES": rules, "APPROVAL_TIMEOUT": "90", "APPROVAL_TIMEOUT_DECISION": "Allow"})
    assert settings.approval_rules == (ApprovalRule("Bash", project_dir="/srv/*"), ApprovalRule("mcp__*", agent="deploy*"))
    assert (settings.approval_timeout, settings.approval_timeout_decision) == (90.0, "allow")
    assert Settings().approval_rules == () and Settings().approval_timeout_decision == "deny"
    for env, message in (
        ({"APPROVAL_RULES": "[{\"tool\": 1}]"}, "APPROVAL_RULES="),
        ({"APPROVAL_RULES": '[{"tool": "Bash", "tools": "x"}]'}, "unknown field `tools`"),
        ({"APPROVAL_RULES_FILE": "/nonexistent/rules.json"}, "cannot read the rules"),
        ({"APPROVAL_RULES": "[]", "APPROVAL_RULES_FILE": str(tmp_path / "rules.json")}, "both set"),
        ({"APPROVAL_TIMEOUT_DECISION": "ask"}, "must be allow or deny"),
        ({"APPROVAL_TIMEOUT": "0"}, "APPROVAL_TIMEOUT="),
    ):
        with pytest.raises(SettingsError, match=message):
            Settings.from_env(env)


def test_rules_file(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text('[{"tool": "Write"}]')
    assert Settings.from_env({"APPROVAL_RULES_FILE": str(path)}).approval_rules == (ApprovalRule("Write"),)
