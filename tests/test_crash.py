"""Crash safety: a coordinator process killed (SIGKILL) in the middle of concurrent event
ingestion, run creation and run claims loses nothing it acknowledged, duplicates nothing,
recovers its runs on restart and serves again. Several cycles, each killed at another point."""

import re
import threading
from collections import Counter

import apsw
import requests

from runner_client import ScriptedRunner
from server_process import ServerProcess
from test_sessions import event

KILL_AFTER = [30, 300, 1000]  # acknowledged requests before the kill, one cycle each
WRITERS, CREATORS, RUNNERS = 4, 2, 2
RECOVERY_ERROR = "Coordinator restarted - execution state unknown"  # RUN_RECOVERY_MODE=all
GONE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class Ledger:
    """What clients sent and what was acknowledged (a 2xx came back), over every cycle."""

    def __init__(self):
        self.markers_sent: dict[str, list[str]] = {}  # session -> event markers attempted
        self.markers_acked: dict[str, list[str]] = {}
        self.runs: dict[str, str] = {}  # run -> its last acknowledged step: created, claimed, started
        self.start_unconfirmed: set[str] = set()  # a start report that got no answer


class Load:
    """One cycle's client threads, hammering the server until it dies."""

    def __init__(self, server: ServerProcess, ledger: Ledger, cycle: int, kill_after: int):
        self.server, self.ledger, self.kill_after = server, ledger, kill_after
        self.lock = threading.Lock()
        self.acknowledged = 0
        self.enough = threading.Event()
        # Sessions and runners exist before the load starts, so every thread has what it needs.
        self.sessions = [f"c{cycle}-w{n}" for n in range(WRITERS)]
        for sid in self.sessions:
            assert server.post("/sessions", {"session_id": sid}).status_code == 200
            ledger.markers_sent[sid], ledger.markers_acked[sid] = [], []
        self.runners = [ScriptedRunner(server.url, hostname=f"c{cycle}-r{n}") for n in range(RUNNERS)]
        assert all(runner.register().status_code == 200 for runner in self.runners)

    def ack(self) -> None:
        with self.lock:
            self.acknowledged += 1
            if self.acknowledged >= self.kill_after:
                self.enough.set()

    def write_events(self, sid: str) -> None:
        with requests.Session() as http:
            for i in range(100_000):  # ends when the server does
                marker = f"{sid}-{i}"
                self.ledger.markers_sent[sid].append(marker)
                try:
                    r = http.post(f"{self.server.url}/sessions/{sid}/events", timeout=10,
                                  json=event(sid, tool_input={"marker": marker}))
                except GONE:
                    return
                assert r.status_code == 200, r.text
                self.ledger.markers_acked[sid].append(marker)
                self.ack()

    def create_runs(self) -> None:
        with requests.Session() as http:
            for _ in range(100_000):
                try:
                    r = http.post(self.server.url + "/runs", json={"type": "start_session", "prompt": "p"},
                                  timeout=10)
                except GONE:
                    return
                assert r.status_code == 200, r.text
                # A runner may have claimed and started it before this thread got to run again.
                self.ledger.runs.setdefault(r.json()["run_id"], "created")
                self.ack()

    def claim_runs(self, runner: ScriptedRunner) -> None:
        with runner.http:
            for i in range(100_000):
                try:
                    r = runner.poll(timeout=10)
                    if r.status_code == 204:
                        continue
                    run_id = r.json()["run"]["run_id"]
                    self.ledger.runs[run_id] = "claimed"
                    self.ack()
                    if i % 2:  # half are started, the others stay claimed
                        continue
                    self.ledger.start_unconfirmed.add(run_id)
                    assert runner.report(run_id, "started").status_code == 200
                    self.ledger.start_unconfirmed.discard(run_id)
                    self.ledger.runs[run_id] = "started"
                    self.ack()
                except GONE:
                    return

    def threads(self) -> list[threading.Thread]:
        return ([threading.Thread(target=self.write_events, args=(sid,)) for sid in self.sessions]
                + [threading.Thread(target=self.create_runs) for _ in range(CREATORS)]
                + [threading.Thread(target=self.claim_runs, args=(runner,)) for runner in self.runners])


def check_recovered(server: ServerProcess, ledger: Ledger) -> None:
    if server.database_url is None:  # PostgreSQL checks its foreign keys itself, and has no such file
        with apsw.Connection(str(server.db_path)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    for sid, sent in ledger.markers_sent.items():
        stored = Counter(e["tool_input"]["marker"] for e in server.get(f"/sessions/{sid}/events").json()["events"])
        assert all(stored[m] == 1 for m in ledger.markers_acked[sid]), "an acknowledged event is lost or doubled"
        assert set(stored) <= set(sent) and max(stored.values(), default=1) == 1
    listed = server.get("/runs").json()["runs"]
    runs = {r["run_id"]: r for r in listed}
    assert len(runs) == len(listed) and set(ledger.runs) <= set(runs)
    # Recovery ran: nothing is left claimed or running for a runner of the dead process.
    assert not [r for r in listed if r["status"] in ("claimed", "running")]
    for run_id, step in ledger.runs.items():
        run = runs[run_id]
        if step == "started":
            assert (run["status"], run["error"]) == ("failed", RECOVERY_ERROR)
        elif run_id not in ledger.start_unconfirmed:  # else it may have started unbeknownst
            assert (run["status"], run["runner_id"]) == ("pending", None)


def test_killed_mid_load_loses_nothing_acknowledged(tmp_path, server_env):
    server = ServerProcess(tmp_path / "project", RUN_RECOVERY_MODE="all", RUNNER_POLL_TIMEOUT="0.5", **server_env)
    ledger = Ledger()
    try:
        server.start()
        for cycle, kill_after in enumerate(KILL_AFTER):
            load = Load(server, ledger, cycle, kill_after)
            threads = load.threads()
            for t in threads:
                t.start()
            assert load.enough.wait(timeout=60), "the load did not reach the kill point"
            server.kill()
            for t in threads:
                t.join(timeout=30)
            assert not any(t.is_alive() for t in threads)
            server.start()
            check_recovered(server, ledger)
        assert server.post("/sessions", {"session_id": "after"}).status_code == 200
        assert len(re.findall(r"run recovery \(mode all\)", server.log())) == len(KILL_AFTER) + 1
        # Every kind of request was in flight at some kill.
        assert all(ledger.markers_acked.values()) and {"claimed", "started"} <= set(ledger.runs.values())
    finally:
        server.kill()
