"""Crash recovery: a coordinator process is SIGKILLed with runs in flight and restarted on the
same data; each RUN_RECOVERY_MODE settles the runs as documented, and registered runners, their
stop commands and queued callbacks carry on."""

import pytest

from runner_client import ScriptedRunner, registered, start_run
from server_process import ServerProcess
from store.stamps import now_ts

OLD = now_ts(-3600)


def run_of(server, run_id) -> dict:
    return server.get(f"/runs/{run_id}").json()


def age(server: ServerProcess, run_ids: list[str]) -> None:
    """Make claims and starts an hour old, as if the crash was long ago (server is down)."""
    server.execute(
        "UPDATE runs SET claimed_at = :old, started_at = CASE WHEN started_at IS NULL THEN NULL ELSE :old END"
        " WHERE run_id = :run_id",
        [{"old": OLD, "run_id": run_id} for run_id in run_ids],
    )


@pytest.fixture
def crashed(tmp_path, server_env):
    """A killed server that left runs claimed, running and stopping, young and old; the runner
    has already received the stop command once."""
    server = ServerProcess(tmp_path / "project", RUNNER_POLL_TIMEOUT="1", **server_env).start()
    runner = registered(server)
    ids = {name: start_run(server, prompt=name)["run_id"]
           for name in ("claimed_old", "claimed_young", "running_old", "running_young", "stopping", "pending")}
    for name in ("claimed_old", "claimed_young", "running_old", "running_young", "stopping"):
        assert runner.next_run()["run_id"] == ids[name]
    for name in ("running_old", "running_young", "stopping"):
        runner.report(ids[name], "started")
    assert server.post(f"/runs/{ids['stopping']}/stop").json()["status"] == "stopping"
    assert runner.poll().json() == {"stop_runs": [ids["stopping"]]}
    server.kill()
    age(server, [ids["claimed_old"], ids["running_old"]])
    yield server, runner, ids
    server.kill()


@pytest.mark.parametrize("mode, expected", [
    ("stale", {"claimed_old": "pending", "claimed_young": "claimed", "running_old": "failed",
               "running_young": "running", "stopping": "stopped", "pending": "pending"}),
    ("all", {"claimed_old": "pending", "claimed_young": "pending", "running_old": "failed",
             "running_young": "failed", "stopping": "stopped", "pending": "pending"}),
    ("none", {"claimed_old": "claimed", "claimed_young": "claimed", "running_old": "running",
              "running_young": "running", "stopping": "stopping", "pending": "pending"}),
    ("bogus", {"claimed_old": "pending", "claimed_young": "claimed", "running_old": "failed",
               "running_young": "running", "stopping": "stopped", "pending": "pending"}),
])
def test_restart_recovers_runs_per_mode(crashed, mode, expected):
    server, runner, ids = crashed
    server.start(RUN_RECOVERY_MODE=mode)
    runs = {name: run_of(server, run_id) for name, run_id in ids.items()}
    assert {name: run["status"] for name, run in runs.items()} == expected
    error = {"all": "Coordinator restarted - execution state unknown"}.get(mode, "Coordinator restarted during execution")
    for run in runs.values():
        if run["status"] == "pending":
            assert (run["runner_id"], run["claimed_at"]) == (None, None)
        if run["status"] in ("failed", "stopped"):
            assert run["completed_at"] and run["error"] == (error if run["status"] == "failed" else None)
    # Sessions are not touched by recovery.
    assert server.get(f"/sessions/{runs['stopping']['session_id']}/status").json() == {"status": "stopping"}
    effective = mode if mode in ("all", "none") else "stale"
    assert f"run recovery (mode {effective})" in server.log()
    # The runner kept its registration: the stop is delivered again, then the queue goes on FIFO.
    assert runner.poll().json() == {"stop_runs": [ids["stopping"]]}
    first_pending = next(name for name in ids if expected[name] == "pending")
    assert runner.next_run()["run_id"] == ids[first_pending]


def test_registered_runner_keeps_working_across_a_restart(tmp_path, server_env):
    with ServerProcess(tmp_path / "project", RUNNER_POLL_TIMEOUT="0.5", **server_env) as server:
        runner = registered(server, tags=["gpu"])
        before = server.get("/runners").json()["runners"]
        server.kill()
        server.start()
        assert server.get("/runners").json()["runners"][0]["registered_at"] == before[0]["registered_at"]
        assert runner.heartbeat().json() == {"ok": True}
        assert runner.poll().status_code == 204
        created = start_run(server, additional_demands={"tags": ["gpu"]})
        assert runner.next_run()["run_id"] == created["run_id"]
        # An identity that is still online is still a duplicate; unknown ids still get 401.
        assert ScriptedRunner(server.url, tags=["gpu"]).register().status_code == 409
        assert server.get("/runner/runs", params={"runner_id": "lnch_unknown"}).status_code == 401


def test_queued_callbacks_survive_a_restart(tmp_path, server_env):
    with ServerProcess(tmp_path / "project", RUNNER_POLL_TIMEOUT="0.5", **server_env) as server:
        runner = registered(server)
        parent = start_run(server)
        runner.execute(runner.next_run(), "delegating")
        server.post(f"/sessions/{parent['session_id']}/bind",
                    {"executor_session_id": "e", "hostname": "h", "executor_type": "t"})
        child = start_run(server, parent_session_id=parent["session_id"], execution_mode="async_callback")
        runner.execute(runner.next_run(), "child result")
        server.kill()
        server.start()
        stop = {"event_type": "session_stop", "session_id": parent["session_id"], "timestamp": now_ts()}
        assert server.post(f"/sessions/{parent['session_id']}/events", stop).status_code == 200
        callback = runner.next_run()
        assert callback["session_id"] == parent["session_id"]
        assert f'"{child["session_id"]}" has completed' in callback["prompt"] and "child result" in callback["prompt"]
