"""The live page at `/`, driven in a real headless Chromium over the DevTools protocol: stored
events, live events and sessions, and a resume after the WebSocket drops."""

import concurrent.futures
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from websockets.sync.client import connect

from runner_client import wait_for
from store.models import ApprovalRule
from test_sessions import assistant, create, event

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="the chromium binary is absent (Debian package `chromium`)"
)


class DevTools:
    """A DevTools protocol session with one page: commands answered in order, events kept."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.exceptions: list[dict] = []

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + 20
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(message["params"]["exceptionDetails"])
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body?.innerText ?? ''")  # no body while navigating


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    with open(tmp_path / "chromium.log", "wb") as log:
        proc = subprocess.Popen(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        # Chromium writes the port it picked into the profile once it listens.
        active = profile / "DevToolsActivePort"
        port = wait_for(lambda: active.exists() and active.read_text().split("\n")[0], "DevTools port")
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20) as ws:
            devtools = DevTools(ws)
            devtools.call("Runtime.enable")
            yield devtools
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_page_is_static_html(server):
    r = server.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<script" in r.text and "/ws?" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing loaded from elsewhere


def test_page_shows_sessions_and_events_live_and_resumes_after_a_drop(server, browser):
    create(server, "ses_page", agent_name="helper")
    server.post("/sessions/ses_page/events", assistant("ses_page", "stored before the page opened", "2025-01-01T00:00:00Z"))

    browser.call("Page.navigate", url=server.url + "/#ses_page")
    wait_for(lambda: "stored before the page opened" in browser.text(), "stored event shown")
    assert "ses_page" in browser.text() and "helper" in browser.text()
    wait_for(lambda: server.state.broadcaster.subscriber_count == 1, "page subscribed")

    server.post("/sessions/ses_page/events", event("ses_page", tool_name="Bash", tool_input={"command": "make live"}))
    wait_for(lambda: "make live" in browser.text(), "live event shown")

    create(server, "ses_other")
    wait_for(lambda: "ses_other" in browser.text(), "new session listed")
    server.post("/sessions/ses_page/events", event("ses_page", "session_stop", reason="completed"))
    status = "document.querySelector('.session.selected .status').textContent"
    wait_for(lambda: browser.evaluate(status) == "finished", "status updated live")

    # Drop the connection; while the page is away an event is stored; it must come back
    # through the resume (`since=<last cursor>`), exactly once.
    browser.evaluate("ws.close()")
    wait_for(lambda: server.state.broadcaster.subscriber_count == 0, "server saw the drop")
    server.post("/sessions/ses_page/events", assistant("ses_page", "sent while away", "2025-01-01T00:00:09Z"))
    assert server.state.broadcaster.subscriber_count == 0  # so it can only arrive by replay
    wait_for(lambda: "sent while away" in browser.text(), "missed event replayed")
    assert browser.text().count("sent while away") == 1
    assert browser.text().count("stored before the page opened") == 1
    assert "live" in browser.evaluate("document.getElementById('state').textContent")

    server.delete("/sessions/ses_other")
    wait_for(lambda: "ses_other" not in browser.text(), "deleted session removed")
    assert browser.exceptions == []


def test_page_under_a_token_passes_it_on(make_server, browser):
    token = "page-token-7c1e"
    srv = make_server(api_token=token)
    bearer = {"Authorization": f"Bearer {token}"}
    srv.post("/sessions", {"session_id": "ses_guarded"}, headers=bearer)
    srv.post("/sessions/ses_guarded/events", assistant("ses_guarded", "stored under a token", "t1"), headers=bearer)

    browser.call("Page.navigate", url=f"{srv.url}/?api_key={token}#ses_guarded")
    wait_for(lambda: "stored under a token" in browser.text(), "stored event fetched with the token")
    wait_for(lambda: srv.state.broadcaster.subscriber_count == 1, "page subscribed with the token")
    srv.post("/sessions/ses_guarded/events", event("ses_guarded", tool_input={"command": "guarded live"}),
             headers=bearer)
    wait_for(lambda: "guarded live" in browser.text(), "live event shown")
    assert browser.exceptions == []


CLAUDE_CODE = Path(__file__).parent / "fixtures" / "claude_code"


def hook(server, name: str) -> requests.Response:
    return requests.post(server.url + "/hooks/claude-code", data=(CLAUDE_CODE / name).read_bytes(), timeout=60)


def click(browser, selector: str) -> None:
    """A real click: the mouse pressed and released over the element's middle."""
    x, y = browser.evaluate(
        f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def test_page_shows_pending_approvals_and_a_click_decides(make_server, browser):
    srv = make_server(approval_rules=(ApprovalRule("Bash"),))
    browser.call("Page.navigate", url=srv.url + "/")
    wait_for(lambda: srv.state.broadcaster.subscriber_count == 1, "page subscribed")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(hook, srv, "05_pre_tool_use_risky.json")
        wait_for(lambda: "Allow Bash?" in browser.text(), "approval shown")
        assert "rm -rf dist && npm run build" in browser.text()  # the input to judge by
        assert not held.done()
        click(browser, ".approval input")
        browser.call("Input.insertText", text="not before the release")
        click(browser, ".approval button.deny")
        answer = held.result(timeout=30)
    assert answer.status_code == 200 and answer.json() == {"hookSpecificOutput": {
        "hookEventName": "PreToolUse", "permissionDecision": "deny", "permissionDecisionReason": "not before the release",
    }}
    wait_for(lambda: "Allow Bash?" not in browser.text(), "decided approval removed")
    (approval,) = srv.get("/approvals").json()["approvals"]
    assert (approval["status"], approval["decided_by"]) == ("decided", "api")

    # One opened after the page loaded it is listed too, and Allow answers allow.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(hook, srv, "07_permission_request.json")
        wait_for(lambda: "Allow Bash?" in browser.text(), "second approval shown")
        click(browser, ".approval button.allow")
        assert held.result(timeout=30).json() == {
            "hookSpecificOutput": {"hookEventName": "PermissionRequest", "decision": {"behavior": "allow"}}}
    assert browser.exceptions == []


def test_page_pairs_tool_calls_shows_agents_runs_and_runners(server, browser):
    for name in sorted(path.name for path in CLAUDE_CODE.glob("[0-1][0-9]_*.json")):
        if name != "07_permission_request.json":
            assert hook(server, name).status_code == 200
    session = json.loads((CLAUDE_CODE / "01_session_start.json").read_text())["session_id"]
    server.post("/runs", {"type": "start_session", "prompt": "p", "agent_name": "helper"})
    server.post("/runner/register", {"hostname": "build-host-7", "project_dir": "/p", "executor_type": "claude-code"})

    browser.call("Page.navigate", url=f"{server.url}/#{session}")
    wait_for(lambda: browser.evaluate("document.querySelectorAll('.event.tool').length") == 4, "four tool calls")
    states = browser.evaluate("[...document.querySelectorAll('.event.tool .status')].map((s) => s.textContent)")
    assert states == ["done", "failed", "done", "done"]  # each call joined by its result
    # Input and output open on demand.
    assert "Tests: 42 passed" not in browser.text()
    browser.evaluate("document.querySelectorAll('.event.tool details').forEach((d) => d.open = true)")
    assert "Tests: 42 passed" in browser.text() and "non-zero status code 1" in browser.text()
    assert "Explore a8a5aea3" in browser.evaluate("document.getElementById('agents').innerText")
    wait_for(lambda: "build-host-7" in browser.text(), "runner listed")
    assert "pending" in browser.evaluate("document.getElementById('runs').innerText")

    hook(server, "16_stop.json")  # live, too
    wait_for(lambda: "all 42 tests pass" in browser.text(), "live message shown")
    assert browser.exceptions == []
