"""The runner protocol over HTTP: registration, long-polls and what wakes them, claims, demand
matching, reports, heartbeats, the runner lifecycle and deregistration."""

import hashlib
import json
import socket
import threading
import time

import pytest
import requests
from websockets.sync.client import connect

from conftest import HeldRunWrites
from runner_client import RUN_KEYS, ScriptedRunner, registered, start_run, wait_for

RUNNER_KEYS = ["runner_id", "registered_at", "last_heartbeat", "hostname", "project_dir", "executor_type",
               "tags", "status", "seconds_since_heartbeat"]


def wait_until_polling(server, runner: ScriptedRunner) -> None:
    """The runner's poll is parked in the server, waiting to be woken."""
    wait_for(lambda: runner.runner_id in server.state.dispatcher._waiters, what="a waiting poll")


class PollInThread:
    """A poll running in a thread; `result()` gives its response and how long it took."""

    def __init__(self, runner: ScriptedRunner):
        self.response = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(runner,))
        self._thread.start()

    def _run(self, runner):
        self.response = runner.poll()
        self.elapsed = time.monotonic() - self.started

    def result(self):
        self._thread.join(timeout=40)
        assert self.response is not None
        return self.response, self.elapsed


def test_a_run_from_queue_to_result(server):
    runner = registered(server)
    created = start_run(server, agent_name="calc", project_dir="/work")
    run = runner.next_run()
    assert list(run) == RUN_KEYS
    assert run["run_id"] == created["run_id"] and run["session_id"] == created["session_id"]
    assert (run["status"], run["runner_id"], run["agent_name"]) == ("claimed", runner.runner_id, "calc")
    assert run["claimed_at"] >= run["created_at"]
    runner.execute(run, "4")
    # What a sync client does: wait for the run, then read the result.
    done = server.get(f"/runs/{run['run_id']}").json()
    assert done["status"] == "completed" and done["started_at"] and done["completed_at"]
    assert server.get(f"/sessions/{run['session_id']}").json()["session"]["status"] == "finished"
    assert server.get(f"/sessions/{run['session_id']}/result").json() == {"result": "4"}


def test_register_answers_deterministic_id_and_settings(server):
    runner = ScriptedRunner(server.url, hostname="h", project_dir="/p", executor_type="x", tags=["gpu"])
    response = runner.register()
    assert response.json() == {
        "runner_id": "lnch_" + hashlib.sha256(b"h:/p:x").hexdigest()[:12],
        "poll_endpoint": "/runner/runs",
        "poll_timeout_seconds": 30,
        "heartbeat_interval_seconds": 60,
    }
    [listed] = server.get("/runners").json()["runners"]
    assert list(listed) == RUNNER_KEYS
    assert listed["registered_at"] == listed["last_heartbeat"] and listed["registered_at"].endswith("+00:00")
    assert (listed["tags"], listed["status"]) == (["gpu"], "online")
    assert 0 <= listed["seconds_since_heartbeat"] < 5
    assert server.post("/runner/register", {"hostname": "h"}).status_code == 422


def test_duplicate_online_runner_gets_object_detail(server):
    first = registered(server, hostname="h", project_dir="/p", executor_type="x")
    response = ScriptedRunner(server.url, hostname="h", project_dir="/p", executor_type="x").register()
    assert response.status_code == 409
    assert response.json()["detail"] == {
        "error": "duplicate_runner",
        "message": f"Runner with identity (h, /p, x) is already registered and online as {first.runner_id}",
        "runner_id": first.runner_id,
        "hostname": "h",
        "project_dir": "/p",
        "executor_type": "x",
    }
    # A pending external deregistration does not free the identity.
    server.delete(f"/runners/{first.runner_id}")
    assert ScriptedRunner(server.url, hostname="h", project_dir="/p", executor_type="x").register().status_code == 409


def _runner_status(server, runner_id):
    return {r["runner_id"]: r for r in server.get("/runners").json()["runners"]}.get(runner_id)


def test_stale_runner_reconnects_and_heartbeat_revives(make_server):
    server = make_server(runner_stale_threshold=0.5, runner_lifecycle_interval=0.05, runner_poll_timeout=0.2)
    runner = registered(server, tags=["a"])
    first = _runner_status(server, runner.runner_id)
    wait_for(lambda: _runner_status(server, runner.runner_id)["status"] == "stale", what="stale")
    # A stale runner still polls (a poll is not a heartbeat).
    assert runner.poll().status_code == 204
    server.delete(f"/runners/{runner.runner_id}")  # flagged, then the runner comes back
    again = ScriptedRunner(server.url, tags=["b"])
    assert again.register().json()["runner_id"] == runner.runner_id
    now = _runner_status(server, runner.runner_id)
    assert now["registered_at"] == first["registered_at"]
    assert now["last_heartbeat"] > first["last_heartbeat"]
    assert (now["status"], now["tags"]) == ("online", ["b"])
    assert runner.poll().status_code == 204  # the deregistration flag was cleared
    # Stale again: re-registering without tags keeps them; a heartbeat alone revives it.
    wait_for(lambda: _runner_status(server, runner.runner_id)["status"] == "stale", what="stale")
    assert ScriptedRunner(server.url).register().status_code == 200
    assert _runner_status(server, runner.runner_id)["tags"] == ["b"]
    wait_for(lambda: _runner_status(server, runner.runner_id)["status"] == "stale", what="stale")
    assert runner.heartbeat().json() == {"ok": True}
    assert _runner_status(server, runner.runner_id)["status"] == "online"


def test_silent_runner_is_removed(make_server):
    server = make_server(runner_stale_threshold=0.1, runner_remove_threshold=0.3, runner_lifecycle_interval=0.05)
    runner = registered(server)
    wait_for(lambda: _runner_status(server, runner.runner_id) is None, what="removal")
    assert runner.poll().status_code == 401
    assert runner.heartbeat().status_code == 401


def test_poll_needs_a_registered_runner(server):
    response = server.get("/runner/runs", params={"runner_id": "lnch_nobody"})
    assert (response.status_code, response.json()) == (401, {"detail": "Runner not registered"})
    assert server.get("/runner/runs").status_code == 422
    response = server.post("/runner/heartbeat", {"runner_id": "lnch_nobody"})
    assert (response.status_code, response.json()) == (401, {"detail": "Runner not registered"})


def test_empty_poll_is_204_after_the_poll_timeout(make_server):
    server = make_server(runner_poll_timeout=0.5)
    runner = registered(server)
    started = time.monotonic()
    response = runner.poll()
    elapsed = time.monotonic() - started
    assert (response.status_code, response.content) == (204, b"")
    assert 0.5 <= elapsed < 2


def test_new_run_wakes_a_waiting_poll_at_once(server):
    runner = registered(server)
    poll = PollInThread(runner)
    wait_until_polling(server, runner)
    created_at = time.monotonic()
    created = start_run(server)
    response, _ = poll.result()
    assert response.json()["run"]["run_id"] == created["run_id"]
    assert poll.started + poll.elapsed - created_at < 1  # not the 30 s poll timeout


def test_stop_command_reaches_a_waiting_poll_at_once(server):
    runner = registered(server)
    start_run(server)
    run = runner.next_run()
    assert runner.report(run["run_id"], "started").status_code == 200
    poll = PollInThread(runner)
    wait_until_polling(server, runner)
    reply = server.post(f"/runs/{run['run_id']}/stop").json()
    assert reply == {"ok": True, "run_id": run["run_id"], "session_id": run["session_id"], "status": "stopping"}
    response, elapsed = poll.result()
    assert response.json() == {"stop_runs": [run["run_id"]]}
    assert elapsed < 5  # woken, not the 30 s poll timeout
    assert runner.report(run["run_id"], "stopped", signal="SIGTERM").json() == {"ok": True}
    assert server.get(f"/runs/{run['run_id']}").json()["status"] == "stopped"
    assert server.get(f"/sessions/{run['session_id']}/status").json() == {"status": "stopped"}


def test_external_deregistration_reaches_a_waiting_poll(server):
    runner = registered(server)
    poll = PollInThread(runner)
    wait_until_polling(server, runner)
    response = server.delete(f"/runners/{runner.runner_id}")
    assert response.json() == {"ok": True, "message": "Runner marked for deregistration", "initiated_by": "external"}
    answer, elapsed = poll.result()
    assert answer.json() == {"deregistered": True} and elapsed < 5
    assert server.get("/runners").json() == {"runners": []}
    assert runner.poll().status_code == 401


def test_flagged_runner_is_listed_until_its_next_poll(make_server):
    server = make_server(runner_poll_timeout=0.2)
    runner = registered(server)
    server.delete(f"/runners/{runner.runner_id}")
    assert _runner_status(server, runner.runner_id) is not None
    assert runner.poll().json() == {"deregistered": True}
    assert _runner_status(server, runner.runner_id) is None


def test_self_deregistration_removes_at_once(server):
    runner = registered(server)
    response = server.delete(f"/runners/{runner.runner_id}", params={"self": "true"})
    assert response.json() == {"ok": True, "message": "Runner deregistered", "initiated_by": "self"}
    assert server.get("/runners").json() == {"runners": []}
    assert runner.poll().status_code == 401
    response = server.delete(f"/runners/{runner.runner_id}", params={"self": "true"})
    assert (response.status_code, response.json()) == (404, {"detail": "Runner not found"})
    assert server.delete(f"/runners/{runner.runner_id}", params={"self": "maybe"}).status_code == 422
    assert registered(server).runner_id == runner.runner_id  # a fresh registration


def test_claims_follow_demands_without_blocking_the_queue(make_server):
    server = make_server(runner_poll_timeout=0.2)
    gpu = registered(server, hostname="h1", tags=["gpu", "linux"])
    plain = registered(server, hostname="h2")
    wants_gpu = start_run(server, additional_demands={"tags": ["gpu"]})
    wants_h2 = start_run(server, additional_demands={"hostname": "h2", "project_dir": ""})
    anyone = start_run(server)
    impossible = start_run(server, additional_demands={"hostname": "h1", "tags": ["gpu", "cuda"]})
    assert plain.next_run()["run_id"] == wants_h2["run_id"]  # skips the gpu run before it
    assert gpu.next_run()["run_id"] == wants_gpu["run_id"]
    assert plain.next_run()["run_id"] == anyone["run_id"]
    assert gpu.poll().status_code == 204 and plain.poll().status_code == 204
    stored = server.get(f"/runs/{impossible['run_id']}").json()
    assert stored["status"] == "pending"
    assert stored["demands"] == {"hostname": "h1", "tags": ["gpu", "cuda"]}
    stored = server.get(f"/runs/{wants_h2['run_id']}").json()
    assert stored["demands"] == {"hostname": "h2", "project_dir": "", "tags": []}


def test_unmatched_run_fails_after_the_no_match_timeout(make_server):
    server = make_server(run_no_match_timeout=0.3, runner_lifecycle_interval=0.05)
    with connect(server.ws_url + "/ws") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "init"
        free = start_run(server)
        stuck = start_run(server, additional_demands={"executor_type": "nowhere"})
        frames = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
    assert [f["type"] for f in frames] == ["session_created", "session_created", "run_failed"]
    assert frames[2] == {"type": "run_failed", "run_id": stuck["run_id"],
                         "error": "No matching runner available within timeout", "session_id": stuck["session_id"]}
    failed = server.get(f"/runs/{stuck['run_id']}").json()
    assert failed["status"] == "failed" and failed["completed_at"] >= failed["timeout_at"]
    assert server.get(f"/runs/{free['run_id']}").json()["status"] == "pending"  # no demands, no timeout
    assert server.get(f"/sessions/{stuck['session_id']}/status").json() == {"status": "pending"}


def test_two_runners_racing_for_100_runs(make_server):
    server = make_server(runner_poll_timeout=0.3)
    runners = [registered(server, hostname=f"h{i}") for i in range(2)]
    claimed: dict[str, list[str]] = {r.runner_id: [] for r in runners}
    total = 100
    done = threading.Event()

    def work(runner):
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            response = runner.poll()
            if response.status_code == 200:
                claimed[runner.runner_id].append(response.json()["run"]["run_id"])
                if sum(map(len, claimed.values())) >= total:
                    done.set()

    threads = [threading.Thread(target=work, args=(r,)) for r in runners]
    for thread in threads:
        thread.start()
    created = [start_run(server)["run_id"] for _ in range(total)]
    for thread in threads:
        thread.join(timeout=40)
    every = [run_id for ids in claimed.values() for run_id in ids]
    assert sorted(every) == sorted(created)  # none twice, none lost
    for runner_id, ids in claimed.items():
        assert all(server.get(f"/runs/{i}").json()["runner_id"] == runner_id for i in ids)


def test_poll_of_a_departed_client_takes_nothing(server):
    runner = registered(server)
    with pytest.raises(requests.ReadTimeout):
        runner.poll(timeout=0.3)
    # The server notices the hang-up and stops waiting (its own timeout is 30 s).
    wait_for(lambda: runner.runner_id not in server.state.dispatcher._waiters, what="the poll to end")
    created = start_run(server)
    assert server.get(f"/runs/{created['run_id']}").json()["status"] == "pending"
    assert runner.next_run()["run_id"] == created["run_id"]


def test_run_claimed_for_a_client_that_just_left_is_put_back(server):
    runner = registered(server)
    created = start_run(server)
    # Hold the writes so that the poll's claim commits only after the client has hung up.
    held = HeldRunWrites(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"GET /runner/runs?runner_id={runner.runner_id} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    waiters = server.state.dispatcher._waiters
    wait_for(lambda: any(w.gone for w in waiters.get(runner.runner_id, ())), what="the hang-up to be noticed")
    held.release()
    wait_for(lambda: runner.runner_id not in waiters, what="the poll to end")
    run = server.get(f"/runs/{created['run_id']}").json()
    assert (run["status"], run["runner_id"], run["claimed_at"]) == ("pending", None, None)
    assert runner.next_run()["run_id"] == created["run_id"]


def test_reports_check_runner_run_and_body(server):
    runner = registered(server)
    run = start_run(server)
    for what in ("started", "completed", "failed", "stopped"):
        response = server.post(f"/runner/runs/{run['run_id']}/{what}", {"runner_id": "lnch_nobody", "error": "x"})
        assert (response.status_code, response.json()) == (401, {"detail": "Runner not registered"})
        response = runner.report("run_nope", what, error="x")
        assert (response.status_code, response.json()) == (404, {"detail": "Run not found"})
    assert runner.report(run["run_id"], "failed").status_code == 422  # `error` is required
    assert server.post(f"/runner/runs/{run['run_id']}/started", {}).status_code == 422


def test_reports_apply_whatever_the_status(server):
    runner = registered(server)
    start_run(server)
    run = runner.next_run()
    assert runner.report(run["run_id"], "started").status_code == 200
    first = server.get(f"/runs/{run['run_id']}").json()
    assert first["status"] == "running" and first["started_at"]
    assert runner.report(run["run_id"], "started").status_code == 200
    assert server.get(f"/runs/{run['run_id']}").json()["started_at"] > first["started_at"]
    assert runner.report(run["run_id"], "failed", error="exit 1").status_code == 200
    failed = server.get(f"/runs/{run['run_id']}").json()
    assert (failed["status"], failed["error"]) == ("failed", "exit 1") and failed["completed_at"]
    # A run failing leaves its session alone.
    assert server.get(f"/sessions/{run['session_id']}/status").json() == {"status": "pending"}
    assert runner.report(run["run_id"], "completed", status="success").status_code == 200
    assert server.get(f"/runs/{run['run_id']}").json()["status"] == "completed"


def test_started_resume_run_links_the_session_to_its_parent(server):
    runner = registered(server)
    parent = start_run(server)
    child = start_run(server)
    response = server.post("/runs", {"type": "resume_session", "prompt": "again", "session_id": child["session_id"],
                                     "parent_session_id": parent["session_id"]})
    resume_id = response.json()["run_id"]
    for _ in range(2):  # the two start runs
        runner.next_run()
    resume = runner.next_run()
    assert resume["run_id"] == resume_id
    assert runner.report(resume_id, "started").status_code == 200
    session = server.get(f"/sessions/{child['session_id']}").json()["session"]
    assert session["parent_session_id"] == parent["session_id"]


def test_a_parked_poll_is_handed_the_new_run_in_the_same_commit(server):
    runner = registered(server)
    poll = PollInThread(runner)
    wait_for(lambda: server.state.dispatcher.idle_runners() == [runner.runner_id], what="a parked poll")
    writes = []
    server.state.db.on_write = lambda verb, seconds: writes.append(verb)
    created = start_run(server)
    response, _ = poll.result()
    assert response.status_code == 200
    run = response.json()["run"]
    assert (run["run_id"], run["status"], run["runner_id"]) == (created["run_id"], "claimed", runner.runner_id)
    # Queued and claimed in one transaction: the poll never ran a round of its own.
    assert [w for w in writes if w in ("create_run_for_waiting", "next_for_runner")] == ["create_run_for_waiting"]


def test_a_run_claimed_for_a_poll_that_left_meanwhile_goes_back(server):
    runner = registered(server)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"GET /runner/runs?runner_id={runner.runner_id} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        wait_for(lambda: server.state.dispatcher.idle_runners() == [runner.runner_id], what="a parked poll")
        # Hold the writes: the run is offered to the parked poll, but commits only after it left.
        held = HeldRunWrites(server)
        creating = threading.Thread(target=lambda: created.append(start_run(server)))
        created = []
        creating.start()
        wait_for(held.waiting, what="the run's write to be held")
    wait_for(lambda: runner.runner_id not in server.state.dispatcher._waiters, what="the poll to end")
    held.release()
    creating.join(timeout=10)
    run = server.get(f"/runs/{created[0]['run_id']}").json()
    assert (run["status"], run["runner_id"], run["claimed_at"]) == ("pending", None, None)
    assert runner.next_run()["run_id"] == created[0]["run_id"]
