"""Runs no runner will report on are settled by the lifecycle check: a stop the runner never
confirms (it had lost the run) after RUN_STOP_TIMEOUT, and the runs in flight of a runner that
is no longer registered at once; their sessions stop and the dashboards hear of it."""

import json

from websockets.sync.client import connect

from runner_client import ScriptedRunner, registered, start_run, wait_for
from server_process import ServerProcess


def recv(ws) -> dict:
    return json.loads(ws.recv(timeout=10))


def run_of(server, run_id: str) -> dict:
    return server.get(f"/runs/{run_id}").json()


def session_status(server, session_id: str) -> str:
    return server.get(f"/sessions/{session_id}/status").json()["status"]


def stopping_run(server, runner: ScriptedRunner) -> dict:
    """A started run whose stop command the runner received and ignores (it lost the run)."""
    start_run(server)
    run = runner.next_run()
    assert runner.report(run["run_id"], "started").json() == {"ok": True}
    assert server.post(f"/runs/{run['run_id']}/stop").json()["status"] == "stopping"
    assert runner.poll().json() == {"stop_runs": [run["run_id"]]}
    return run


def test_a_stop_nobody_confirms_is_settled_after_the_stop_timeout(make_server):
    server = make_server(run_stop_timeout=0.3, runner_lifecycle_interval=0.05, runner_poll_timeout=0.2)
    runner = registered(server)
    with connect(server.ws_url + "/ws") as ws:
        assert recv(ws)["type"] == "init"
        run = stopping_run(server, runner)
        frames = [recv(ws) for _ in range(3)]
    assert [(frame["type"], frame["session"]["status"]) for frame in frames] == [
        ("session_created", "pending"), ("session_updated", "stopping"), ("session_updated", "stopped")]
    stopped = run_of(server, run["run_id"])
    assert (stopped["status"], stopped["error"]) == ("stopped", None) and stopped["completed_at"]
    assert session_status(server, run["session_id"]) == "stopped"


def test_a_stop_is_given_the_stop_timeout(make_server):
    server = make_server(run_stop_timeout=300, run_no_match_timeout=0.1, runner_lifecycle_interval=0.05,
                         runner_poll_timeout=0.2)
    run = stopping_run(server, registered(server))
    # Runs nobody can take fail at a lifecycle check: two in a row mean a whole check ran since.
    for _ in range(2):
        marker = start_run(server, additional_demands={"executor_type": "nowhere"})
        wait_for(lambda: run_of(server, marker["run_id"])["status"] == "failed", what="a lifecycle check")
    assert run_of(server, run["run_id"])["status"] == "stopping"
    assert session_status(server, run["session_id"]) == "stopping"


def test_runs_of_a_removed_runner_fail_and_their_sessions_stop(make_server):
    server = make_server(runner_stale_threshold=1, runner_remove_threshold=2, runner_lifecycle_interval=0.05,
                         runner_poll_timeout=0.2)
    gone = registered(server, hostname="gone")
    parent = start_run(server)
    gone.execute(gone.next_run(), "delegating")  # the parent is finished, waiting for its child
    child = start_run(server, parent_session_id=parent["session_id"], execution_mode="async_callback")
    assert gone.next_run()["run_id"] == child["run_id"]
    assert gone.report(child["run_id"], "started").json() == {"ok": True}
    claimed = start_run(server)
    assert gone.next_run()["run_id"] == claimed["run_id"]
    stopping = stopping_run(server, gone)
    with connect(server.ws_url + "/ws") as ws:
        assert recv(ws)["type"] == "init"
        assert gone.heartbeat().json() == {"ok": True}  # then silence until it is removed
        frames = [recv(ws) for _ in range(5)]
    assert server.get("/runners").json() == {"runners": []}
    error = "Runner no longer registered"
    failed = sorted((frame for frame in frames if frame["type"] == "run_failed"), key=lambda f: f["run_id"])
    assert failed == sorted(({"type": "run_failed", "run_id": run["run_id"], "error": error,
                              "session_id": run["session_id"]} for run in (child, claimed)), key=lambda f: f["run_id"])
    updated = {frame["session"]["session_id"]: frame["session"]["status"]
               for frame in frames if frame["type"] == "session_updated"}
    assert updated == {run["session_id"]: "stopped" for run in (child, claimed, stopping)}
    for run in (child, claimed):
        assert (run_of(server, run["run_id"])["status"], run_of(server, run["run_id"])["error"]) == ("failed", error)
    assert run_of(server, stopping["run_id"])["status"] == "stopped"
    assert session_status(server, parent["session_id"]) == "finished"
    # The parent hears of its child's failure, as from the runner's own report.
    callback = registered(server, hostname="other").next_run()
    assert callback["session_id"] == parent["session_id"]
    assert callback["prompt"].startswith(f'The child agent session "{child["session_id"]}" has failed.')
    assert f"## Error\n\n{error}" in callback["prompt"]


def test_a_stop_lost_in_a_restart_of_everything_is_settled(tmp_path, server_env):
    env = {"RUNNER_POLL_TIMEOUT": "0.5", "RUNNER_LIFECYCLE_INTERVAL": "0.1", "RUN_STOP_TIMEOUT": "0.5", **server_env}
    with ServerProcess(tmp_path / "project", **env) as server:
        run = stopping_run(server, registered(server))
        server.kill()
        server.start()
        # The run was settled at start-up; its runner, restarted too, gets the stop command again
        # and ignores it, as the run is not its own any more. The session waits for nothing.
        runner = registered(server)
        assert runner.poll().json() == {"stop_runs": [run["run_id"]]}
        assert run_of(server, run["run_id"])["status"] == "stopped"
        wait_for(lambda: session_status(server, run["session_id"]) == "stopped", what="the session stopped")
        assert "Traceback" not in server.log()
