"""A scripted runner speaking the runner protocol over HTTP the way the real runner does, plus
the executor calls a run makes (bind, events, session_stop), and small helpers for tests that
drive runs."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import requests

RUN_KEYS = ["run_id", "type", "session_id", "agent_name", "prompt", "project_dir", "parent_session_id",
            "execution_mode", "demands", "status", "runner_id", "error", "created_at", "claimed_at",
            "started_at", "completed_at", "timeout_at"]

# The real runner waits POLL_TIMEOUT (30 s) + 5 s for a poll answer.
CLIENT_POLL_TIMEOUT = 35


def stamp() -> str:
    return datetime.now(timezone.utc).isoformat()


class ScriptedRunner:
    def __init__(self, url: str, hostname: str = "host-1", project_dir: str = "/work",
                 executor_type: str = "claude-code", tags: list[str] | None = None):
        self.url = url
        self.identity = {"hostname": hostname, "project_dir": project_dir, "executor_type": executor_type}
        self.tags = tags or []
        self.runner_id: str | None = None
        self.http = requests.Session()

    def register(self) -> requests.Response:
        body = dict(self.identity, **({"tags": self.tags} if self.tags else {}))
        response = self.http.post(self.url + "/runner/register", json=body, timeout=10)
        if response.status_code == 200:
            self.runner_id = response.json()["runner_id"]
        return response

    def poll(self, timeout: float = CLIENT_POLL_TIMEOUT) -> requests.Response:
        return self.http.get(self.url + "/runner/runs", params={"runner_id": self.runner_id}, timeout=timeout)

    def next_run(self, deadline_s: float = 10) -> dict:
        """Poll until a run is handed out (bounded); stop commands or a deregistration fail."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            response = self.poll()
            if response.status_code == 200:
                assert "run" in response.json(), response.json()
                return response.json()["run"]
            assert response.status_code == 204, response.text
        raise AssertionError("no run handed out in time")

    def report(self, run_id: str, what: str, **body) -> requests.Response:
        return self.http.post(f"{self.url}/runner/runs/{run_id}/{what}",
                              json={"runner_id": self.runner_id, **body}, timeout=10)

    def heartbeat(self) -> requests.Response:
        return self.http.post(self.url + "/runner/heartbeat", json={"runner_id": self.runner_id}, timeout=10)

    def execute(self, run: dict, answer: str) -> None:
        """Do what the runner and its executor do for a run that succeeds with `answer`."""
        session_id = run["session_id"]
        assert self.report(run["run_id"], "started").status_code == 200
        session_url = f"{self.url}/sessions/{session_id}"
        bind = {"executor_session_id": "exec-" + session_id, "hostname": self.identity["hostname"],
                "executor_type": self.identity["executor_type"], "project_dir": self.identity["project_dir"]}
        assert self.http.post(session_url + "/bind", json=bind, timeout=10).status_code == 200
        for event in (
            {"event_type": "message", "role": "user", "content": [{"type": "text", "text": run["prompt"]}]},
            {"event_type": "message", "role": "assistant", "content": [{"type": "text", "text": answer}]},
            {"event_type": "session_stop", "exit_code": 0, "reason": "completed"},
        ):
            event = {"session_id": session_id, "timestamp": stamp(), **event}
            assert self.http.post(session_url + "/events", json=event, timeout=10).status_code == 200
        assert self.report(run["run_id"], "completed", status="success").status_code == 200


def wait_for(condition, what: str = "condition", timeout: float = 20.0):
    """Re-check `condition` until it is truthy (returned) or the deadline passes (the test fails)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what} ({timeout:g} s)"
        time.sleep(0.01)
    return value


def start_run(server, **body) -> dict:
    response = server.post("/runs", {"type": "start_session", "prompt": "go", **body})
    assert response.status_code == 200, response.text
    return response.json()


def registered(server, **identity) -> ScriptedRunner:
    runner = ScriptedRunner(server.url, **identity)
    assert runner.register().status_code == 200
    return runner
