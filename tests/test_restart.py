"""Restarts with runners attached: a runner restarted along with the coordinator takes its old
registration over, while one that lived through the restart keeps its identity to itself."""

from runner_client import ScriptedRunner, registered, start_run
from server_process import ServerProcess


def test_runner_restarted_with_the_coordinator_takes_its_registration_over(tmp_path):
    with ServerProcess(tmp_path / "project", RUNNER_POLL_TIMEOUT="0.5") as server:
        before = registered(server, tags=["gpu"])
        [listed] = server.get("/runners").json()["runners"]
        server.stop()
        server.start()
        # The runner process was restarted too: it registers again, knowing nothing of its id.
        again = ScriptedRunner(server.url, tags=["gpu"])
        response = again.register()
        assert response.status_code == 200, response.text
        assert response.json()["runner_id"] == before.runner_id
        [now] = server.get("/runners").json()["runners"]
        assert (now["registered_at"], now["status"], now["tags"]) == (listed["registered_at"], "online", ["gpu"])
        assert now["last_heartbeat"] > listed["last_heartbeat"]
        created = start_run(server, additional_demands={"tags": ["gpu"]})
        assert again.next_run()["run_id"] == created["run_id"]
        # Seen alive since the start now: another registration of the identity is a duplicate.
        duplicate = ScriptedRunner(server.url, tags=["gpu"]).register()
        assert duplicate.status_code == 409
        assert duplicate.json()["detail"]["error"] == "duplicate_runner"


def test_runner_that_polled_since_the_restart_keeps_its_identity(tmp_path):
    with ServerProcess(tmp_path / "project", RUNNER_POLL_TIMEOUT="0.5") as server:
        survivor = registered(server)
        [listed] = server.get("/runners").json()["runners"]
        server.kill()
        server.start()
        assert survivor.poll().status_code == 204  # it lived through the restart
        # That first poll since the start was recorded as a sign of life.
        assert server.get("/runners").json()["runners"][0]["last_heartbeat"] > listed["last_heartbeat"]
        response = ScriptedRunner(server.url).register()
        assert response.status_code == 409
        assert response.json()["detail"]["runner_id"] == survivor.runner_id
        assert survivor.poll().status_code == 204
