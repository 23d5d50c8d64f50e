"""GET /metrics on a real server: off by default, then every family from real traffic."""

import time
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from test_sessions import create, event


def scrape(server, **kwargs) -> dict[tuple[str, tuple], float]:
    r = server.get("/metrics", **kwargs)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.text)
        for sample in family.samples
    }


def test_off_unless_enabled(server):
    r = server.get("/metrics")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_metrics_from_real_traffic(make_server):
    srv = make_server(metrics_enabled=True)
    create(srv, "a")
    create(srv, "b")
    srv.get("/sessions/a")
    srv.get("/sessions/b")
    srv.get("/sessions/missing")
    srv.get("/nowhere/at/all")
    srv.post("/sessions/a/events", event("a"))
    srv.post("/sessions/b/events", event("b"))
    srv.post("/events", event("a", "message"))
    assert srv.post("/sessions/a/events", {"event_type": "x"}).status_code == 422  # not ingested
    assert srv.post("/runs", {"type": "start_session", "prompt": "p"}).status_code == 200
    runner = {"hostname": "h", "project_dir": "/p", "executor_type": "claude-code"}
    assert srv.post("/runner/register", runner).status_code == 200

    with connect(srv.ws_url + "/ws") as ws:
        ws.recv(timeout=10)
        m = scrape(srv)
    assert m[("coordinator_live_subscribers", ())] == 1
    assert m[("coordinator_live_subscribers_dropped_total", ())] == 0

    def requests_(method, route, status):
        labels = (("method", method), ("route", route), ("status", str(status)))
        return m.get(("coordinator_http_requests_total", labels), 0)

    assert requests_("GET", "/sessions/{session_id}", 200) == 2
    assert requests_("GET", "/sessions/{session_id}", 404) == 1
    assert requests_("POST", "/sessions/{session_id}/events", 422) == 1
    assert requests_("GET", "unmatched", 404) == 1
    assert not any("/sessions/a" in dict(labels).get("route", "") for _, labels in m)  # templates only
    latency = ("coordinator_http_request_duration_seconds_count", (("method", "POST"), ("route", "/sessions")))
    assert m[latency] == 2
    assert m[("coordinator_events_ingested_total", ())] == 3

    assert m[("coordinator_runs", (("status", "pending"),))] == 1
    assert m[("coordinator_runs", (("status", "completed"),))] == 0
    assert m[("coordinator_runners", (("status", "online"),))] == 1
    assert m[("coordinator_run_claim_latency_seconds_count", ())] == 0
    assert m[("coordinator_runners", (("status", "stale"),))] == 0

    writes = "coordinator_store_write_duration_seconds_count"
    assert m[(writes, (("verb", "create_session"),))] == 2
    assert m[(writes, (("verb", "append_event"),))] == 2

    runner_id = srv.post("/runner/register", {**runner, "hostname": "h2"}).json()["runner_id"]
    claimed = srv.get(f"/runner/runs?runner_id={runner_id}").json()["run"]
    m = scrape(srv)
    assert m[("coordinator_run_claim_latency_seconds_count", ())] == 1
    waited = (datetime.fromisoformat(claimed["claimed_at"]) - datetime.fromisoformat(claimed["created_at"]))
    assert m[("coordinator_run_claim_latency_seconds_sum", ())] == pytest.approx(waited.total_seconds())

    # The WebSocket is counted once it has closed.
    deadline = time.monotonic() + 10
    while requests_("WS", "/ws", 101) == 0:
        assert time.monotonic() < deadline, "WebSocket never counted"
        time.sleep(0.01)
        m = scrape(srv)


def test_each_app_has_its_own_registry(make_server):
    first, second = make_server(metrics_enabled=True), make_server(metrics_enabled=True)
    create(first, "only-here")
    key = ("coordinator_http_requests_total", (("method", "POST"), ("route", "/sessions"), ("status", "200")))
    assert scrape(first)[key] == 1
    assert key not in scrape(second)


def test_requests_refused_before_routing_keep_their_route(make_server):
    srv = make_server(metrics_enabled=True, api_token="t0ken")
    assert srv.get("/sessions/x").status_code == 401
    assert srv.get("/metrics").status_code == 401
    m = scrape(srv, headers={"Authorization": "Bearer t0ken"})
    key = ("coordinator_http_requests_total", (("method", "GET"), ("route", "/sessions/{session_id}"), ("status", "401")))
    assert m[key] == 1
