"""GET /openapi.json: every route of the router is documented, and real answers from a running
server, for every operation, validate against the schemas of their status."""

import json

import pytest
import requests
from jsonschema import Draft202012Validator
from starlette.routing import Route, WebSocketRoute

from test_sessions import assistant, event


@pytest.fixture
def doc(server):
    r = server.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def router_operations(app) -> set[tuple[str, str]]:
    found = set()
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            found.add(("GET", route.path))  # the upgrade request
        else:
            assert isinstance(route, Route)
            found |= {(method, route.path) for method in route.methods - {"HEAD"}}
    return found


def test_every_route_is_documented_and_nothing_else(server, doc):
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == router_operations(server.app)
    assert doc["openapi"] == "3.1.0"
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


class Checker:
    """Validates answers against the document and remembers which operations were seen."""

    def __init__(self, server, doc):
        self.server = server
        self.doc = doc
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, method: str, template: str, path: str | None = None, expect: int = 200, **kwargs):
        r = requests.request(method, self.server.url + (path or template), timeout=30, **kwargs)
        assert r.status_code == expect, (method, path, r.status_code, r.text)
        responses = self.doc["paths"][template][method.lower()]["responses"]
        assert str(r.status_code) in responses, f"{method} {template}: {r.status_code} is not documented"
        content = responses[str(r.status_code)].get("content")
        if content is None:
            assert r.content == b""
        elif "application/json" in content:
            schema = content["application/json"]["schema"] | {"components": self.doc["components"]}
            Draft202012Validator(schema).validate(r.json())
        else:
            (media_type,) = content
            assert r.headers["content-type"].startswith(media_type)
        self.seen.add((method, template))
        return r


def test_real_answers_validate(make_server):
    srv = make_server(runner_poll_timeout=0.2)
    doc = srv.get("/openapi.json").json()
    check = Checker(srv, doc)

    check("GET", "/health")
    check("GET", "/")
    check("GET", "/openapi.json")
    check("GET", "/metrics", expect=404)

    # sessions and events
    check("POST", "/sessions", json={"session_id": "s1", "agent_name": "helper"})
    check("POST", "/sessions", json={"session_id": "s1"}, expect=409)
    check("POST", "/sessions", json={"session_id": 1}, expect=422)
    check("GET", "/sessions")
    check("GET", "/sessions", "/sessions?limit=0", expect=422)
    check("GET", "/sessions/{session_id}", "/sessions/s1")
    check("GET", "/sessions/{session_id}", "/sessions/nope", expect=404)
    check("GET", "/sessions/{session_id}/status", "/sessions/nope/status")
    check("GET", "/sessions/{session_id}/affinity", "/sessions/s1/affinity")
    bind = {"executor_session_id": "e", "hostname": "h", "executor_type": "claude-code"}
    check("POST", "/sessions/{session_id}/bind", "/sessions/s1/bind", json=bind)
    check("PATCH", "/sessions/{session_id}/metadata", "/sessions/s1/metadata", json={"agent_name": "other"})
    check("POST", "/sessions/{session_id}/events", "/sessions/s1/events", json=assistant("s1", "done", "2025-01-01T00:00:01Z"))
    check("POST", "/sessions/{session_id}/events", "/sessions/s1/events", json=event("s2"), expect=400)
    check("GET", "/sessions/{session_id}/result", "/sessions/s1/result", expect=400)
    check("POST", "/sessions/{session_id}/events", "/sessions/s1/events", json=event("s1", "session_stop"))
    check("GET", "/sessions/{session_id}/result", "/sessions/s1/result")
    check("GET", "/sessions/{session_id}/events", "/sessions/s1/events")
    check("GET", "/sessions/{session_id}/events", "/sessions/s1/events?after=0&limit=1")
    check("POST", "/sessions/{session_id}/stop", "/sessions/s1/stop")
    check("POST", "/events", json=event("s2", "session_start"))
    check("GET", "/events/{session_id}", "/events/s2")

    # runs and runners
    run = check("POST", "/runs", json={"type": "start_session", "prompt": "p"}).json()
    check("GET", "/runs")
    check("GET", "/runs/{run_id}", f"/runs/{run['run_id']}")
    check("GET", "/runs/{run_id}", "/runs/nope", expect=404)
    runner = {"hostname": "h", "project_dir": "/p", "executor_type": "claude-code", "tags": ["x"]}
    runner_id = check("POST", "/runner/register", json=runner).json()["runner_id"]
    check("POST", "/runner/register", json=runner, expect=409)  # detail is an object
    poll = "/runner/runs?runner_id=" + runner_id
    assert check("GET", "/runner/runs", poll).json()["run"]["run_id"] == run["run_id"]
    check("GET", "/runner/runs", poll, expect=204)
    check("GET", "/runner/runs", "/runner/runs?runner_id=nope", expect=401)
    report = {"runner_id": runner_id}
    for step in ("started", "completed", "stopped"):
        check("POST", f"/runner/runs/{{run_id}}/{step}", f"/runner/runs/{run['run_id']}/{step}", json=report)
    check("POST", "/runner/runs/{run_id}/failed", f"/runner/runs/{run['run_id']}/failed", json=report | {"error": "x"})
    check("POST", "/runner/heartbeat", json=report)
    check("POST", "/runner/heartbeat", json={"runner_id": "nope"}, expect=401)
    claimed = check("POST", "/runs", json={"type": "start_session", "prompt": "p"}).json()
    check("GET", "/runner/runs", poll)
    check("POST", "/runs/{run_id}/stop", f"/runs/{claimed['run_id']}/stop")
    assert check("GET", "/runner/runs", poll).json() == {"stop_runs": [claimed["run_id"]]}
    check("GET", "/runners")
    check("DELETE", "/runners/{runner_id}", f"/runners/{runner_id}")
    assert check("GET", "/runner/runs", poll).json() == {"deregistered": True}
    runner_id = check("POST", "/runner/register", json=runner).json()["runner_id"]
    check("DELETE", "/runners/{runner_id}", f"/runners/{runner_id}?self=true")
    check("DELETE", "/runners/{runner_id}", "/runners/nope?self=maybe", expect=422)

    # agents
    agent = {"name": "helper", "description": "d", "tags": ["a"], "mcp_servers": {"m": {"command": "c", "args": []}}}
    check("POST", "/agents", json=agent, expect=201)
    check("POST", "/agents", json=agent | {"name": "bad name"}, expect=400)
    check("GET", "/agents", "/agents?tags=a")
    check("GET", "/agents/{name}", "/agents/helper")
    check("PATCH", "/agents/{name}", "/agents/helper", json={"system_prompt": "hi", "demands": {"tags": ["x"]}})
    check("PATCH", "/agents/{name}/status", "/agents/helper/status", json={"status": "inactive"})
    check("DELETE", "/agents/{name}", "/agents/helper", expect=204)
    check("GET", "/agents/{name}", "/agents/helper", expect=404)

    # live updates; the WebSocket upgrade is covered by test_live
    with requests.get(srv.url + "/sse/sessions", stream=True, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        check.seen.add(("GET", "/sse/sessions"))
    check.seen.add(("GET", "/ws"))
    check("DELETE", "/sessions/{session_id}", "/sessions/s1")

    assert check.seen == router_operations(srv.app)  # every operation answered for real


def test_schemas_follow_the_structs(doc):
    session = doc["components"]["schemas"]["Session"]
    assert list(session["properties"]) == [
        "session_id", "status", "created_at", "project_dir", "agent_name", "last_resumed_at",
        "parent_session_id", "execution_mode", "executor_session_id", "executor_type", "hostname",
    ]
    body = doc["paths"]["/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CreateSession"}
    assert json.dumps(doc).count("#/components/schemas/") > 40
