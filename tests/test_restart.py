"""Restarts with runners attached: a SIGTERM answers the held long-polls at once and the process
exits cleanly; a runner restarted along with the coordinator takes its old registration over,
while one that lived through the restart keeps its identity to itself."""

import http.client
import signal
import time

from runner_client import ScriptedRunner, registered, start_run
from server_process import ServerProcess
from test_runner import PollInThread, wait_until_polling


def test_sigterm_answers_a_held_poll_at_once_and_exits_cleanly(tmp_path, server_env):
    with ServerProcess(tmp_path / "project", **server_env) as server:  # polls are held the default 30 s
        runner = registered(server)
        poll = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        poll.request("GET", f"/runner/runs?runner_id={runner.runner_id}")
        # Answered on another connection opened later: by then the server has read the poll.
        assert server.get("/health").status_code == 200
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        response = poll.getresponse()
        assert (response.status, response.read()) == (204, b"")
        assert response.getheader("connection") == "close"
        assert server.proc.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn raises the signal again
        assert time.monotonic() - signalled < 5  # a bound: the graceful shutdown waited 10 s for it
        log = server.log()
        assert "GET /runner/runs 204" in log
        assert "Traceback" not in log and "ERROR" not in log, log


def test_the_test_server_stops_the_same_way(make_server):
    server = make_server()
    runners = [registered(server, hostname=name) for name in ("h1", "h2")]
    polls = [PollInThread(runner) for runner in runners]
    for runner in runners:
        wait_until_polling(server, runner)
    server.stop()
    assert server.state.shutting_down.is_set()
    for poll in polls:
        response, elapsed = poll.result()
        assert (response.status_code, response.content) == (204, b"")
        assert elapsed < 5  # a bound: not the 30 s poll timeout


def test_runner_restarted_with_the_coordinator_takes_its_registration_over(tmp_path, server_env):
    with ServerProcess(tmp_path / "project", RUNNER_POLL_TIMEOUT="0.5", **server_env) as server:
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


def test_runner_that_polled_since_the_restart_keeps_its_identity(tmp_path, server_env):
    with ServerProcess(tmp_path / "project", RUNNER_POLL_TIMEOUT="0.5", **server_env) as server:
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
