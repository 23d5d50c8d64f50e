"""Several coordinator processes on one PostgreSQL database behave as one service behind a load
balancer: any request to any replica, runs dispatched across replicas at once and claimed once,
live updates exactly once wherever a subscriber resumes, periodic duties run once, and nothing
acknowledged is lost when a replica is killed or the replicas are restarted one at a time."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import threading
import time
from pathlib import Path

import psycopg
import pytest
import requests

from runner_client import ScriptedRunner, registered, start_run, wait_for
from server_process import ServerProcess
from test_approvals import PRE_TOOL
from test_changelog import Subscriber, assert_every_change_once, writer

# Polls end every 2 s, so runners cycle over the replicas; lifecycle checks run often.
FAST = {"RUNNER_POLL_TIMEOUT": "2", "RUNNER_LIFECYCLE_INTERVAL": "0.2"}


@pytest.fixture
def database(postgres_database) -> str:
    return postgres_database.fresh_schema()


@pytest.fixture
def start_replicas(database: str, tmp_path: Path):
    """`start_replicas(2, **env)`: coordinator processes on the test's database, started side by
    side (each with its own project dir and log, one agents dir for all); killed at the end."""
    started: list[ServerProcess] = []

    def start(count: int, **env: str) -> list[ServerProcess]:
        made = [
            ServerProcess(tmp_path / f"replica-{len(started) + n}", COORDINATOR_DATABASE_URL=database,
                          AGENT_ORCHESTRATOR_AGENTS_DIR=str(tmp_path / "agents"), **env)
            for n in range(count)
        ]
        started.extend(made)
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            list(pool.map(ServerProcess.start, made))
        return made

    yield start
    for replica in started:
        replica.kill()


def query(url: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


class Hopping:
    """A `server` for the helpers of other test files whose `url` and `ws_url` are the next
    replica's at each use: requests and resumed subscriptions hop between replicas."""

    def __init__(self, replicas: list[ServerProcess]):
        self.replicas = replicas
        self._turn = itertools.count()

    @property
    def url(self) -> str:
        return self.replicas[next(self._turn) % len(self.replicas)].url

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):]


class Balancer:
    """What a round-robin load balancer in front of the replicas does: each request goes to the
    next replica; one that refuses or drops the connection (stopping, dead) is skipped and the
    request tried on the next, `attempts` times in all. `failures` counts what was skipped."""

    def __init__(self, replicas: list[ServerProcess]):
        self.replicas = replicas
        self._turn = itertools.count()
        self.http = requests.Session()
        self.failures = 0

    def once(self, method: str, path: str, timeout: float = 10, **kwargs) -> requests.Response:
        replica = self.replicas[next(self._turn) % len(self.replicas)]
        try:
            return self.http.request(method, replica.url + path, timeout=timeout, **kwargs)
        except requests.ConnectionError:
            self.failures += 1
            raise

    def request(self, method: str, path: str, attempts: int = 10, **kwargs) -> requests.Response:
        for attempt in range(attempts):
            try:
                return self.once(method, path, **kwargs)
            except requests.ConnectionError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")


class BalancedRunner(threading.Thread):
    """A runner behind the balancer: polls (one try per poll, as the real runner does; three
    failed polls in a row would make it exit), executes each run it gets (reports retried, as
    the balancer would), and counts its longest streak of failed polls."""

    def __init__(self, replicas: list[ServerProcess], hostname: str):
        super().__init__(daemon=True)
        self.balancer = Balancer(replicas)
        response = self.balancer.request("POST", "/runner/register",
                                         json={"hostname": hostname, "project_dir": "/w", "executor_type": "x"})
        assert response.status_code == 200, response.text
        self.runner_id = response.json()["runner_id"]
        self.executed: list[str] = []
        self.failed_in_a_row = self.worst_streak = 0
        self.stopping = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping:
                try:
                    response = self.balancer.once("GET", "/runner/runs", params={"runner_id": self.runner_id}, timeout=10)
                    ok = response.status_code in (200, 204)
                except requests.ConnectionError:
                    ok = False
                self.failed_in_a_row = 0 if ok else self.failed_in_a_row + 1
                self.worst_streak = max(self.worst_streak, self.failed_in_a_row)
                if not ok:
                    time.sleep(0.2)
                    continue
                if response.status_code == 200:
                    assert "run" in response.json(), response.text
                    self.execute(response.json()["run"]["run_id"])
        except BaseException as exc:  # reported by the test
            self.error = exc

    def execute(self, run_id: str) -> None:
        self.executed.append(run_id)
        for what in ("started", "completed"):
            response = self.balancer.request("POST", f"/runner/runs/{run_id}/{what}", json={"runner_id": self.runner_id})
            assert response.status_code == 200, response.text


class HoppingSubscriber(Subscriber):
    """`test_changelog.Subscriber` on the next replica at each round; a round cut off by a
    replica that dies (or refusing, dead) ends, and the next resumes from the last cursor."""

    def __init__(self, replicas: list[ServerProcess], transport: str, seed: int):
        super().__init__(Hopping(replicas), transport, seed)

    def sse_round(self, frames: int) -> None:
        try:
            super().sse_round(frames)
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            pass


class Creator(threading.Thread):
    """A client queueing runs and posting events through the balancer; notes what was
    acknowledged. (A request cut off by a dying replica is tried again on the next, as a
    balancer may: it may then have queued a run twice, of which one is acknowledged.)"""

    def __init__(self, replicas: list[ServerProcess], name: str):
        super().__init__(daemon=True)
        self.balancer = Balancer(replicas)
        self.name = name
        self.runs: list[str] = []
        self.events = 0
        self.stopping = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for n in itertools.count():
                if self.stopping:
                    return
                try:
                    response = self.balancer.request("POST", "/runs", json={"type": "start_session", "prompt": "go"})
                    assert response.status_code == 200, response.text
                    self.runs.append(response.json()["run_id"])
                    session_id = response.json()["session_id"]
                    body = {"event_type": "post_tool", "session_id": session_id,
                            "timestamp": "2025-01-01T00:00:00+00:00", "tool_input": {"n": n}}
                    response = self.balancer.request("POST", f"/sessions/{session_id}/events", json=body)
                    assert response.status_code == 200, response.text
                    self.events += 1
                except requests.ConnectionError:
                    continue
                time.sleep(0.02)
        except BaseException as exc:
            self.error = exc


def settle_load(database: str, runners: list[BalancedRunner], creators: list[Creator]) -> None:
    """Stop the load, then check: every acknowledged run completed, each executed exactly once,
    no runner saw three failed polls in a row."""
    for creator in creators:
        creator.stopping = True
        creator.join(timeout=30)
        assert creator.error is None, repr(creator.error)
    acknowledged = [run_id for creator in creators for run_id in creator.runs]
    assert len(acknowledged) > 20

    def all_completed() -> bool:
        rows = dict(query(database, "SELECT run_id, status FROM runs"))
        return all(rows.get(run_id) == "completed" for run_id in acknowledged)

    wait_for(all_completed, timeout=40, what="every acknowledged run completed")
    for runner in runners:
        runner.stopping = True
    for runner in runners:
        runner.join(timeout=15)
        assert runner.error is None, repr(runner.error)
        assert runner.worst_streak < 3, f"{runner.runner_id}: {runner.worst_streak} failed polls in a row"
    executed = [run_id for runner in runners for run_id in runner.executed]
    assert len(executed) == len(set(executed)), "a run was handed out twice"
    assert set(acknowledged) <= set(executed)


# -- any request to any replica; dispatch ------------------------------------------------------


def test_run_created_on_one_replica_goes_at_once_to_a_runner_polling_on_another(start_replicas, database):
    a, b = start_replicas(2, RUNNER_POLL_TIMEOUT="20")
    runner = registered(b)
    assert a.get("/runners").json()["runners"][0]["runner_id"] == runner.runner_id  # B's write, read on A
    latencies = []
    for n in range(5):
        answer: list[requests.Response] = []
        poll = threading.Thread(target=lambda: answer.append(runner.poll()))
        poll.start()
        time.sleep(0.2)  # the poll is parked on B by now (if not, it claims at once: no harm)
        created_at = time.monotonic()
        created = start_run(a, prompt=f"run {n}")
        poll.join(timeout=15)
        latencies.append(time.monotonic() - created_at)
        assert answer and answer[0].status_code == 200, answer
        run = answer[0].json()["run"]
        assert (run["run_id"], run["status"], run["runner_id"]) == (created["run_id"], "claimed", runner.runner_id)
        assert b.get(f"/runs/{created['run_id']}").json()["status"] == "claimed"
    # A bound, not a benchmark: far below the 20 s the poll would otherwise wait.
    assert max(latencies) < 3, latencies


def test_stop_and_deregistration_reach_a_runner_parked_on_another_replica(start_replicas):
    a, b = start_replicas(2, RUNNER_POLL_TIMEOUT="20")
    runner = registered(a)
    created = start_run(b)
    run = runner.next_run()
    assert runner.report(run["run_id"], "started").status_code == 200

    def parked_poll_answer(action) -> tuple[float, requests.Response]:
        answer: list[requests.Response] = []
        poll = threading.Thread(target=lambda: answer.append(runner.poll()))
        poll.start()
        time.sleep(0.3)  # parked on A
        started = time.monotonic()
        action()
        poll.join(timeout=15)
        assert answer, "the poll did not end"
        return time.monotonic() - started, answer[0]

    took, answer = parked_poll_answer(lambda: b.post(f"/runs/{created['run_id']}/stop"))
    assert answer.status_code == 200 and answer.json() == {"stop_runs": [created["run_id"]]}
    assert took < 3
    took, answer = parked_poll_answer(lambda: b.delete(f"/runners/{runner.runner_id}"))
    assert answer.status_code == 200 and answer.json() == {"deregistered": True}
    assert took < 3
    assert a.get("/runners").json()["runners"] == [] and b.get("/runners").json()["runners"] == []


def test_each_run_claimed_once_by_runners_polling_on_three_replicas(start_replicas, database):
    replicas = start_replicas(3, RUNNER_POLL_TIMEOUT="1")
    total = 60
    got: dict[str, list[str]] = {}
    runners = [registered(replicas[n % 3], hostname=f"h{n}") for n in range(6)]

    def work(runner: ScriptedRunner) -> None:
        deadline = time.monotonic() + 40
        while sum(map(len, got.values())) < total and time.monotonic() < deadline:
            response = runner.poll()
            assert response.status_code in (200, 204), response.text
            if response.status_code == 200:
                got.setdefault(response.json()["run"]["run_id"], []).append(runner.runner_id)

    threads = [threading.Thread(target=work, args=(runner,)) for runner in runners]
    for thread in threads:
        thread.start()
    created = [start_run(replicas[n % 3], prompt=str(n))["run_id"] for n in range(total)]
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(got) == sorted(created)
    assert all(len(holders) == 1 for holders in got.values()), {k: v for k, v in got.items() if len(v) > 1}
    stored = dict(((run_id, (status, runner_id)) for run_id, status, runner_id in
                   query(database, "SELECT run_id, status, runner_id FROM runs")))
    assert stored == {run_id: ("claimed", holders[0]) for run_id, holders in got.items()}


# -- live updates ------------------------------------------------------------------------------


def test_subscribers_hopping_between_replicas_get_every_change_once_in_order(start_replicas, database):
    replicas = start_replicas(2, SSE_HEARTBEAT_INTERVAL="0.2")
    subscribers = [HoppingSubscriber(replicas, transport, seed) for seed, transport in enumerate(["ws", "sse", "ws"])]
    for subscriber in subscribers:
        subscriber.start()
    acknowledged: list = []
    writers = [threading.Thread(target=writer, args=(Hopping(replicas), f"w{n}", 120, n, acknowledged)) for n in range(3)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(timeout=90)
    assert len(acknowledged) == 3 * 120
    log = query(database, "SELECT id, type, session_id FROM changes ORDER BY id")
    for subscriber in subscribers:
        subscriber.until = log[-1][0]
    for subscriber in subscribers:
        subscriber.join(timeout=60)
        assert subscriber.error is None, repr(subscriber.error)
    assert_every_change_once(subscribers, log)


def test_an_approval_held_on_one_replica_is_answered_at_once_when_decided_on_another(start_replicas):
    a, b = start_replicas(2, APPROVAL_RULES=json.dumps([{"tool": "Bash"}]), APPROVAL_TIMEOUT="60")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    hook = pool.submit(a.post, "/hooks/claude-code", PRE_TOOL, timeout=60)
    (approval,) = wait_for(lambda: b.get("/approvals?status=pending").json()["approvals"], what="approval pending")
    decided_at = time.monotonic()
    assert b.post(f"/approvals/{approval['approval_id']}", {"decision": "deny", "reason": "no"}).status_code == 200
    answer = hook.result(timeout=30)
    assert time.monotonic() - decided_at < 3  # not at the 60 s time-out
    assert answer.status_code == 200 and answer.json()["hookSpecificOutput"]["permissionDecision"] == "deny"
    pool.shutdown()


# -- duties --------------------------------------------------------------------------------------


def test_no_match_timeout_fails_a_run_once_and_another_replica_takes_over_when_the_leader_dies(
    start_replicas, database
):
    replicas = start_replicas(3, RUN_NO_MATCH_TIMEOUT="0.5", **FAST)
    demands = {"additional_demands": {"tags": ["nobody-has-this"]}}
    first = [start_run(replicas[n % 3], **demands)["run_id"] for n in range(6)]

    def failed(run_ids) -> bool:
        rows = dict(query(database, "SELECT run_id, status FROM runs"))
        return all(rows[run_id] == "failed" for run_id in run_ids)

    wait_for(lambda: failed(first), timeout=15, what="the runs failed")
    leaders = [r for r in replicas if "now runs the periodic duties" in r.log()]
    assert len(leaders) == 1, [r.log() for r in replicas]
    leaders[0].kill()
    second = [start_run(r, **demands)["run_id"] for r in replicas if r is not leaders[0]]
    wait_for(lambda: failed(second), timeout=15, what="the runs failed under a new leader")
    time.sleep(1)  # several more lifecycle rounds on every replica
    announced = query(database, "SELECT payload FROM changes WHERE type = 'run_failed'")
    run_ids = sorted(json.loads(payload)["run_id"] for (payload,) in announced)
    assert run_ids == sorted(first + second)
    assert sum("now runs the periodic duties" in r.log() for r in replicas) == 2


def test_a_replica_started_beside_others_leaves_their_runs_alone(start_replicas, database):
    a, = start_replicas(1, RUN_RECOVERY_MODE="all")
    runner = registered(a)
    created = start_run(a)
    run = runner.next_run()
    assert runner.report(run["run_id"], "started").status_code == 200
    b, = start_replicas(1, RUN_RECOVERY_MODE="all")
    assert "run recovery skipped: other coordinators serve this database" in b.log()
    assert b.get(f"/runs/{created['run_id']}").json()["status"] == "running"
    # Alone again after a full stop: recovery runs as on a single process.
    a.stop()
    b.stop()
    c, = start_replicas(1, RUN_RECOVERY_MODE="all")
    assert "run recovery (mode all)" in c.log()
    assert c.get(f"/runs/{created['run_id']}").json()["status"] == "failed"


def test_a_claim_whose_answer_never_reached_the_runner_is_handed_out_again(start_replicas, database):
    a, b = start_replicas(2, RUN_CLAIM_TIMEOUT="1", **FAST)
    runner = registered(b)
    created = start_run(a)
    # What a replica killed between committing a claim and answering the poll leaves behind.
    with psycopg.connect(database) as conn:
        conn.execute("UPDATE runs SET status = 'claimed', runner_id = %s, claimed_at = %s WHERE run_id = %s",
                     (runner.runner_id, time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), created["run_id"]))
    run = runner.next_run(deadline_s=15)
    assert run["run_id"] == created["run_id"] and run["status"] == "claimed"
    assert any("pending again: not started within 1 s" in r.log() for r in (a, b))


# -- a replica dies; rolling restart --------------------------------------------------------------


def test_replica_killed_under_load_loses_nothing(start_replicas, database):
    replicas = start_replicas(3, RUN_CLAIM_TIMEOUT="5", **FAST)
    runners = [BalancedRunner(replicas, f"h{n}") for n in range(3)]
    creators = [Creator(replicas, f"c{n}") for n in range(2)]
    subscriber = HoppingSubscriber(replicas, "sse", 7)
    for thread in [*runners, *creators, subscriber]:
        thread.start()
    wait_for(lambda: sum(len(c.runs) for c in creators) >= 15, timeout=30, what="load under way")
    replicas[0].kill()  # still in the balancer's rotation: refused, the next is tried
    wait_for(lambda: sum(len(c.runs) for c in creators) >= 40, timeout=30, what="load after the kill")
    settle_load(database, runners, creators)
    assert sum(c.events for c in creators) > 0
    log = query(database, "SELECT id FROM changes ORDER BY id")
    subscriber.until = log[-1][0]
    subscriber.join(timeout=30)
    assert subscriber.error is None, repr(subscriber.error)
    cursors = [cursor for cursor, _, _ in subscriber.received]
    assert cursors == sorted(set(cursors)) and {cursor for (cursor,) in log} <= set(cursors)


def test_rolling_restart_under_load(start_replicas, database):
    replicas = start_replicas(2, **FAST)
    runners = [BalancedRunner(replicas, f"h{n}") for n in range(3)]
    creators = [Creator(replicas, "c0")]
    for thread in [*runners, *creators]:
        thread.start()
    for replica in list(replicas):
        wait_for(lambda: sum(len(c.runs) for c in creators) >= 10, timeout=30, what="load under way")
        replica.stop()  # SIGTERM: held polls answered at once
        replica.start()
        count = sum(len(c.runs) for c in creators)
        wait_for(lambda: sum(len(c.runs) for c in creators) >= count + 10, timeout=30, what="load after a restart")
    settle_load(database, runners, creators)
    assert all("run recovery skipped" in r.log() for r in replicas)
