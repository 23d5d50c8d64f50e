"""GET /openapi.json: every route of the router is documented, and real answers from a running
server, for every operation, validate against the schemas of their status: for requests
written out here, and for requests the document itself describes."""

import concurrent.futures
import itertools
import json
import re
import time

import pytest
import requests
from jsonschema import Draft202012Validator
from starlette.routing import Route, WebSocketRoute

from store.models import ApprovalRule
from test_live import sse_frames
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


def validator(doc, schema: dict) -> Draft202012Validator:
    return Draft202012Validator(schema | {"components": doc["components"]})


def assert_documented(doc, method: str, template: str, r: requests.Response) -> None:
    """The answer's status is declared for the operation and its body fits the declared schema.
    An SSE stream is read up to its first heartbeat (the server's interval must be short)."""
    responses = doc["paths"][template][method.lower()]["responses"]
    assert str(r.status_code) in responses, f"{method} {template}: {r.status_code} is not documented: {r.text}"
    content = responses[str(r.status_code)].get("content")
    if content is None:
        assert r.content == b""
        return
    ((media_type, declared),) = content.items()
    assert r.headers["content-type"].startswith(media_type)
    schema = validator(doc, declared["schema"])
    if media_type == "application/json":
        schema.validate(r.json())
    elif media_type == "text/event-stream":
        for frame in itertools.takewhile(lambda frame: isinstance(frame, dict), sse_frames(r)):
            schema.validate(frame)
            json.loads(frame["data"])
    else:
        schema.validate(r.text)


class Checker:
    """Validates answers against the document and remembers which operations were seen."""

    def __init__(self, server, doc):
        self.server = server
        self.doc = doc
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, method: str, template: str, path: str | None = None, expect: int = 200, **kwargs):
        with requests.request(method, self.server.url + (path or template), timeout=30, stream=True, **kwargs) as r:
            assert r.status_code == expect, (method, path, r.status_code, r.text)
            assert_documented(self.doc, method, template, r)
        self.seen.add((method, template))
        return r


def test_real_answers_validate(make_server):
    srv = make_server(runner_poll_timeout=0.2, sse_heartbeat_interval=0.2, approval_rules=(ApprovalRule("Danger"),))
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
    check("POST", "/runs", json={"type": "resume_session", "prompt": "p"}, expect=422)
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

    # Claude Code hooks and approvals
    hook = {"session_id": "cc1", "hook_event_name": "SessionStart", "cwd": "/p"}
    check("POST", "/hooks/claude-code", json=hook)
    check("POST", "/hooks/claude-code", json={"hook_event_name": "Stop"}, expect=422)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [
            pool.submit(check, "POST", "/hooks/claude-code", json=hook | {"hook_event_name": name, "tool_name": "Danger"})
            for name in ("PreToolUse", "PermissionRequest")
        ]
        while len(found := requests.get(srv.url + "/approvals?status=pending", timeout=10).json()["approvals"]) < 2:
            time.sleep(0.02)
        check("GET", "/approvals", "/approvals?status=pending")
        check("GET", "/approvals", "/approvals?limit=0", expect=422)
        for approval in found:
            path = f"/approvals/{approval['approval_id']}"
            check("GET", "/approvals/{approval_id}", path)
            check("GET", "/approvals/{approval_id}/wait", path + "/wait?timeout=0")
            check("POST", "/approvals/{approval_id}", path, json={"decision": "deny", "reason": "no"})
            check("POST", "/approvals/{approval_id}", path, json={"decision": "allow"}, expect=409)
        assert {r.result().json()["hookSpecificOutput"]["hookEventName"] for r in held} == {"PreToolUse", "PermissionRequest"}
    check("GET", "/approvals/{approval_id}", "/approvals/nope", expect=404)
    check("GET", "/approvals/{approval_id}/wait", "/approvals/nope/wait?timeout=3601", expect=422)
    check("POST", "/approvals", json={"session_id": "cc1", "tool_name": "Deploy", "tool_input": {"env": "prod"}})
    check("POST", "/approvals", json={"session_id": "nope", "tool_name": "Deploy"}, expect=404)

    # live updates; the WebSocket upgrade is covered by test_live
    check("GET", "/sse/sessions")
    check("GET", "/sse/sessions", "/sse/sessions?include_init=maybe", expect=422)
    check("GET", "/ws", expect=426)
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


# -- requests the document describes --------------------------------------------------------


def component(doc, schema: dict) -> dict:
    return doc["components"]["schemas"][schema["$ref"].rpartition("/")[2]]


def example(doc, schema: dict, full: bool = False):
    """A value `schema` accepts, with only the required properties or, when `full`, all of them;
    the first value of an enum or, when `full`, the last, so both ends of a choice are sent."""
    if "$ref" in schema:
        value = example(doc, component(doc, schema), full)
    elif "anyOf" in schema or "oneOf" in schema:
        value = example(doc, (schema.get("anyOf") or schema["oneOf"])[0], full)
    elif "enum" in schema:
        value = schema["enum"][-1 if full else 0]
    elif schema.get("type", "object") == "object":
        required = schema.get("required", [])
        properties = schema.get("properties", {}).items()
        value = {name: example(doc, sub, full) for name, sub in properties if full or name in required}
    else:
        value = {"string": "x" * schema.get("minLength", 1), "integer": schema.get("minimum", 0),
                 "number": 0, "boolean": True, "array": [], "null": None}[schema["type"]]
    if "if" in schema and validator(doc, schema["if"]).is_valid(value):
        value |= example(doc, schema["then"], full)
    return value


def cases(doc, operation: dict):
    """(accepted, query, body) for one operation: a minimal and a full request the document
    accepts, then each query value and body it refuses. A bytes body is sent as it is."""
    params = [p for p in operation.get("parameters", []) if p["in"] == "query"]
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    for full in (False, True):
        query = {p["name"]: example(doc, p["schema"], full) for p in params if full or p["required"]}
        accepted = example(doc, body, full) if body else None
        assert body is None or validator(doc, body).is_valid(accepted)  # the examples are right
        yield True, query, accepted
    query = {p["name"]: example(doc, p["schema"]) for p in params if p["required"]}
    minimal = example(doc, body) if body else None
    for p in params:
        if p["required"]:
            yield False, {k: v for k, v in query.items() if k != p["name"]}, minimal
        schema = p["schema"]
        beyond = [schema[bound] + step for bound, step in (("minimum", -1), ("maximum", 1)) if bound in schema]
        for bad in ["nope", *beyond]:
            if not validator(doc, schema).is_valid(bad):
                yield False, query | {p["name"]: bad}, minimal
    if body:
        yield False, query, b"{"
        properties = component(doc, body)["properties"]
        wrong_bodies = [[], {}] + [minimal | {name: wrong} for name in properties for wrong in (7, "x", [], {})]
        yield from ((False, query, wrong) for wrong in wrong_bodies if not validator(doc, body).is_valid(wrong))


def _query_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def test_every_operation_answers_as_the_document_says(make_server):
    """Each answer's status is declared and its body fits; a request the document accepts is never
    refused as malformed (422), and one it refuses is never accepted."""
    srv = make_server(runner_poll_timeout=0.2, sse_heartbeat_interval=0.2)
    doc = srv.get("/openapi.json").json()
    operations = [(method.upper(), path, op) for path, ops in doc["paths"].items() for method, op in ops.items()]
    # Deletions last, so that what the others create ("x" everywhere) is there for the rest.
    operations.sort(key=lambda operation: operation[0] == "DELETE")
    sent = 0
    for method, template, operation in operations:
        url = srv.url + re.sub(r"{\w+}", "x", template)
        for accepted, query, body in cases(doc, operation):
            kwargs = {"params": {name: _query_text(value) for name, value in query.items()}}
            if isinstance(body, bytes):
                kwargs |= {"data": body, "headers": {"Content-Type": "application/json"}}
            elif body is not None:
                kwargs["json"] = body
            with requests.request(method, url, timeout=30, stream=True, **kwargs) as r:
                assert_documented(doc, method, template, r)
            assert r.status_code != 422 if accepted else 400 <= r.status_code < 500, (
                method, template, query, body, r.status_code, r.text
            )
            sent += 1
    assert sent > 3 * len(operations)  # refused requests were sent too, not only accepted ones
