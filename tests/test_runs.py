"""The runs API over HTTP: queueing start and resume runs, demands, listing, stopping runs and
sessions, session deletion, and callbacks from async_callback children to their parents."""

import json
from datetime import datetime, timedelta

import pytest
from websockets.sync.client import connect

from runner_client import RUN_KEYS, registered, stamp, start_run


def recv(ws) -> dict:
    return json.loads(ws.recv(timeout=10))


def run_of(server, run_id) -> dict:
    return server.get(f"/runs/{run_id}").json()


def status_of(server, session_id) -> str:
    return server.get(f"/sessions/{session_id}/status").json()["status"]


def resume(server, session_id, **body) -> dict:
    response = server.post("/runs", {"type": "resume_session", "prompt": "more", "session_id": session_id, **body})
    assert response.status_code == 200, response.text
    return response.json()


def post_event(server, session_id, event_type, **fields):
    event = {"event_type": event_type, "session_id": session_id, "timestamp": stamp(), **fields}
    assert server.post(f"/sessions/{session_id}/events", event).status_code == 200


# -- POST /runs ---------------------------------------------------------------------------


def test_start_run_creates_the_session_and_announces_it(server):
    with connect(server.ws_url + "/ws") as ws:
        recv(ws)
        response = server.post("/runs", {"type": "start_session", "prompt": "hi", "agent_name": "a",
                                         "project_dir": "/p", "execution_mode": "async_poll"})
        reply = response.json()
        assert list(reply) == ["run_id", "session_id", "status"] and reply["status"] == "pending"
        assert reply["run_id"].startswith("run_") and len(reply["run_id"]) == 16
        assert reply["session_id"].startswith("ses_") and len(reply["session_id"]) == 16
        announced = recv(ws)
    session = server.get(f"/sessions/{reply['session_id']}").json()["session"]
    assert announced == {"type": "session_created", "session": session}
    assert (session["status"], session["agent_name"], session["project_dir"], session["execution_mode"]) == (
        "pending", "a", "/p", "async_poll")
    run = run_of(server, reply["run_id"])
    assert list(run) == RUN_KEYS
    assert run == {**run, "type": "start_session", "prompt": "hi", "execution_mode": "async_poll", "demands": None,
                   "status": "pending", "runner_id": None, "timeout_at": None, "claimed_at": None}


def test_start_run_with_a_taken_session_id_is_409(server):
    start_run(server, session_id="mine")
    response = server.post("/runs", {"type": "start_session", "prompt": "x", "session_id": "mine"})
    assert (response.status_code, response.json()) == (409, {"detail": "Session 'mine' already exists"})
    assert len(server.get("/runs").json()["runs"]) == 1


def test_start_run_with_an_unknown_parent_is_404(server):
    response = server.post("/runs", {"type": "start_session", "prompt": "x", "parent_session_id": "ghost"})
    assert response.status_code == 404
    assert server.get("/runs").json() == {"runs": []} and server.get("/sessions").json() == {"sessions": []}


def test_resume_run_takes_agent_and_project_from_the_session(server):
    first = start_run(server, agent_name="a", project_dir="/p")
    with connect(server.ws_url + "/ws") as ws:
        recv(ws)
        reply = resume(server, first["session_id"])
        own = resume(server, first["session_id"], agent_name="b", project_dir="/q")
        # Nothing was announced for the resumes: the next frame is this PATCH's.
        server.patch(f"/sessions/{first['session_id']}/metadata", json={})
        assert recv(ws)["type"] == "session_updated"
    assert reply["session_id"] == first["session_id"]
    run = run_of(server, reply["run_id"])
    assert (run["type"], run["agent_name"], run["project_dir"]) == ("resume_session", "a", "/p")
    assert (run_of(server, own["run_id"])["agent_name"], run_of(server, own["run_id"])["project_dir"]) == ("b", "/q")


@pytest.mark.parametrize("body, status, detail", [
    ({"type": "resume_session", "prompt": "x"}, 422, None),
    ({"type": "resume_session", "prompt": "x", "session_id": "ghost"}, 404, "Session not found"),
    ({"type": "start_session", "prompt": "x", "additional_demands": {"tags": "x"}}, 422, None),
    ({"type": "start_session", "prompt": "x", "additional_demands": {"hostname": 1}}, 422, None),
    ({"type": "start_session", "prompt": "x", "execution_mode": "later"}, 422, None),
    ({"type": "pause_session", "prompt": "x"}, 422, None),
    ({"type": "start_session"}, 422, None),
])
def test_invalid_run_requests_change_nothing(server, body, status, detail):
    response = server.post("/runs", body)
    assert response.status_code == status
    if detail:
        assert response.json() == {"detail": detail}
    else:
        assert isinstance(response.json()["detail"], list)
    assert server.get("/runs").json() == {"runs": []}
    assert server.get("/sessions").json() == {"sessions": []}


def test_demands_merge_blueprint_and_request(server):
    agent = {"name": "bp", "description": "d", "demands": {"hostname": "h-bp", "tags": ["x"]}}
    assert server.post("/agents", agent).status_code == 201
    reply = start_run(server, agent_name="bp", additional_demands={
        "hostname": "h-req", "executor_type": "e", "tags": ["y", "x"], "unknown": 1})
    run = run_of(server, reply["run_id"])
    assert run["demands"] == {"hostname": "h-bp", "executor_type": "e", "tags": ["x", "y"]}
    created, timeout = (datetime.fromisoformat(run[k]) for k in ("created_at", "timeout_at"))
    assert timedelta(seconds=299) < timeout - created < timedelta(seconds=301)
    # A resume without agent_name ignores the session's blueprint; unknown agents are no error.
    assert run_of(server, resume(server, reply["session_id"])["run_id"])["demands"] is None
    plain = run_of(server, start_run(server, agent_name="nobody")["run_id"])
    assert (plain["demands"], plain["timeout_at"]) == (None, None)
    tagged = run_of(server, start_run(server, additional_demands={"tags": ["z"]})["run_id"])
    assert tagged["demands"] == {"tags": ["z"]} and tagged["timeout_at"]


# -- GET /runs ----------------------------------------------------------------------------


def test_list_runs_oldest_first_with_a_status_filter(server):
    ids = [start_run(server)["run_id"] for _ in range(3)]
    server.post(f"/runs/{ids[1]}/stop")
    runs = server.get("/runs").json()["runs"]
    assert [r["run_id"] for r in runs] == ids
    assert [r["run_id"] for r in server.get("/runs", params={"status": "stopped"}).json()["runs"]] == [ids[1]]
    assert server.get("/runs", params={"status": "nonsense"}).json() == {"runs": []}


def test_unknown_run_is_404(server):
    for response in (server.get("/runs/run_nope"), server.post("/runs/run_nope/stop")):
        assert (response.status_code, response.json()) == (404, {"detail": "Run not found"})


# -- stopping -----------------------------------------------------------------------------


def test_stop_pending_run_cancels_it(server):
    reply = start_run(server)
    with connect(server.ws_url + "/ws") as ws:
        recv(ws)
        response = server.post(f"/runs/{reply['run_id']}/stop")
        frame = recv(ws)
    assert response.json() == {"ok": True, "run_id": reply["run_id"], "session_id": reply["session_id"],
                               "status": "stopped", "message": "Run cancelled before execution"}
    run = run_of(server, reply["run_id"])
    assert run["status"] == "stopped" and run["completed_at"]
    assert (frame["type"], frame["session"]["status"]) == ("session_updated", "stopped")
    response = server.post(f"/runs/{reply['run_id']}/stop")
    assert (response.status_code, response.json()) == (400, {"detail": "Run cannot be stopped (status: stopped)"})


@pytest.mark.parametrize("started", [False, True])
def test_stop_claimed_or_running_run_asks_its_runner(server, started):
    runner = registered(server)
    reply = start_run(server)
    runner.next_run()
    if started:
        runner.report(reply["run_id"], "started")
    with connect(server.ws_url + "/ws") as ws:
        recv(ws)
        response = server.post(f"/runs/{reply['run_id']}/stop")
        frame = recv(ws)
    assert response.json() == {"ok": True, "run_id": reply["run_id"], "session_id": reply["session_id"],
                               "status": "stopping"}
    run = run_of(server, reply["run_id"])
    assert (run["status"], run["completed_at"]) == ("stopping", None)
    assert (frame["type"], frame["session"]["status"]) == ("session_updated", "stopping")
    again = server.post(f"/runs/{reply['run_id']}/stop")
    assert (again.status_code, again.json()) == (400, {"detail": "Run cannot be stopped (status: stopping)"})
    assert runner.poll().json() == {"stop_runs": [reply["run_id"]]}


def test_stop_run_whose_runner_is_gone_settles_it(server):
    runner = registered(server)
    reply = start_run(server)
    runner.next_run()
    server.delete(f"/runners/{runner.runner_id}", params={"self": "true"})
    response = server.post(f"/runs/{reply['run_id']}/stop")
    assert response.status_code == 200 and response.json()["status"] == "stopped"
    assert run_of(server, reply["run_id"])["status"] == "stopped"
    assert status_of(server, reply["session_id"]) == "stopped"


def test_stop_session_states(server):
    assert server.post("/sessions/ghost/stop").json() == {"detail": "Session not found"}
    server.post("/sessions", {"session_id": "idle"})
    assert server.post("/sessions/idle/stop").json() == {
        "ok": True, "session_id": "idle", "status": "stopped",
        "message": "No active run found - session marked as stopped"}
    assert status_of(server, "idle") == "stopped"
    assert server.post("/sessions/idle/stop").json() == {
        "ok": True, "session_id": "idle", "status": "stopped", "message": "Session already stopped"}
    server.post("/sessions", {"session_id": "done"})
    post_event(server, "done", "session_stop")
    assert server.post("/sessions/done/stop").json()["message"] == "Session already finished"
    server.post("/sessions", {"session_id": "live"})
    server.post("/sessions/live/bind", {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
    assert server.post("/sessions/live/stop").json()["status"] == "stopped"
    assert status_of(server, "live") == "stopped"


def test_stop_session_cancels_its_pending_run(server):
    reply = start_run(server)
    response = server.post(f"/sessions/{reply['session_id']}/stop").json()
    assert response == {"ok": True, "run_id": reply["run_id"], "session_id": reply["session_id"],
                        "status": "stopped", "message": "Run cancelled before execution"}


def test_stop_session_targets_the_newest_active_run(server):
    runner = registered(server)
    first = start_run(server)
    runner.execute(runner.next_run(), "done")
    later = resume(server, first["session_id"])
    run = runner.next_run()
    assert run["run_id"] == later["run_id"]
    runner.report(run["run_id"], "started")
    server.post(f"/sessions/{first['session_id']}/bind",
                {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
    response = server.post(f"/sessions/{first['session_id']}/stop").json()
    assert (response["run_id"], response["status"]) == (later["run_id"], "stopping")
    assert status_of(server, first["session_id"]) == "stopping"
    assert server.post(f"/sessions/{first['session_id']}/stop").json()["message"] == "Session is already being stopped"
    # Re-bound while its run is still stopping: nothing left to stop, the session ends.
    server.post(f"/sessions/{first['session_id']}/bind",
                {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
    response = server.post(f"/sessions/{first['session_id']}/stop").json()
    assert response == {"ok": True, "session_id": first["session_id"], "run_id": later["run_id"], "status": "stopped",
                        "message": "Run already in stopping state - session marked as stopped"}


def test_deleting_a_session_removes_its_runs(server):
    runner = registered(server)
    reply = start_run(server)
    runner.next_run()
    assert server.delete(f"/sessions/{reply['session_id']}").status_code == 200
    assert server.get("/runs").json() == {"runs": []}
    assert server.get(f"/runs/{reply['run_id']}").status_code == 404
    assert server.post(f"/runs/{reply['run_id']}/stop").status_code == 404


# -- callbacks ----------------------------------------------------------------------------


def finished_parent(server, runner) -> str:
    parent = start_run(server, agent_name="boss", project_dir="/boss")
    runner.execute(runner.next_run(), "delegated")
    return parent["session_id"]


def child_of(server, parent_id, mode="async_callback") -> dict:
    return start_run(server, parent_session_id=parent_id, execution_mode=mode)


def test_child_result_resumes_a_finished_parent(server):
    runner = registered(server)
    parent_id = finished_parent(server, runner)
    child = child_of(server, parent_id)
    runner.execute(runner.next_run(), "child says hi")
    callback = runner.next_run()
    assert callback["prompt"] == (
        f'The child agent session "{child["session_id"]}" has completed.\n\n## Child Result\n\nchild says hi'
        "\n\nPlease continue with the orchestration based on this result.")
    parent = server.get(f"/sessions/{parent_id}").json()["session"]  # project_dir as bound
    assert callback == {**callback, "type": "resume_session", "session_id": parent_id, "agent_name": "boss",
                        "project_dir": parent["project_dir"], "parent_session_id": None, "execution_mode": "sync",
                        "demands": None, "timeout_at": None}


def test_sync_children_and_legacy_events_send_no_callback(make_server):
    server = make_server(runner_poll_timeout=0.2)
    runner = registered(server)
    parent_id = finished_parent(server, runner)
    child_of(server, parent_id, "sync")
    runner.execute(runner.next_run(), "quiet")
    legacy = child_of(server, parent_id)
    stop = {"event_type": "session_stop", "session_id": legacy["session_id"], "timestamp": stamp()}
    assert server.post("/events", stop).status_code == 200
    runner.next_run()  # the legacy child's run itself
    assert runner.poll().status_code == 204


def test_outcomes_for_a_busy_parent_are_delivered_together(server):
    runner = registered(server)
    parent_id = finished_parent(server, runner)
    server.post(f"/sessions/{parent_id}/bind", {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
    ok, failing, stopped = (child_of(server, parent_id) for _ in range(3))
    runs = {run["session_id"]: run for run in (runner.next_run() for _ in range(3))}
    runner.execute(runs[ok["session_id"]], "all good")
    runner.report(failing["run_id"], "failed", error="exit code 2")
    runner.report(stopped["run_id"], "stopped", signal="SIGKILL")
    assert status_of(server, stopped["session_id"]) == "stopped"
    assert len([r for r in server.get("/runs").json()["runs"] if r["session_id"] == parent_id]) == 1  # queued
    post_event(server, parent_id, "session_stop")
    callback = runner.next_run()
    assert callback["session_id"] == parent_id
    assert callback["prompt"] == (
        "Multiple child agent sessions have completed.\n\n"
        f"### Child: {ok['session_id']} (completed)\n\nall good\n\n---\n\n"
        f"### Child: {failing['session_id']} (FAILED)\n\nexit code 2\n\n---\n\n"
        f"### Child: {stopped['session_id']} (FAILED)\n\nSession was manually stopped"
        "\n\nPlease continue with the orchestration based on these results.")


def test_failed_child_of_a_finished_parent(server):
    runner = registered(server)
    parent_id = finished_parent(server, runner)
    child = child_of(server, parent_id)
    runner.next_run()
    runner.report(child["run_id"], "failed", error="")
    assert runner.next_run()["prompt"] == (
        f'The child agent session "{child["session_id"]}" has failed.\n\n## Error\n\nUnknown error'
        "\n\nPlease handle this failure and continue with the orchestration.")


def test_deleting_a_parent_drops_its_queued_callbacks(make_server):
    server = make_server(runner_poll_timeout=0.2)
    runner = registered(server)
    parent_id = finished_parent(server, runner)
    server.post(f"/sessions/{parent_id}/bind", {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
    child = child_of(server, parent_id)
    runner.execute(runner.next_run(), "queued result")
    assert server.state.db.read_sync(lambda c: c.execute("SELECT count(*) FROM callbacks").fetchone()[0]) == 1
    server.delete(f"/sessions/{parent_id}")
    assert server.state.db.read_sync(lambda c: c.execute("SELECT count(*) FROM callbacks").fetchone()[0]) == 0
    assert server.get(f"/runs/{child['run_id']}").json()["status"] == "completed"
    assert runner.poll().status_code == 204
