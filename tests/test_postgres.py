"""What only the PostgreSQL backend has: its configuration and start-up faults, the change-log
tail that must never pass a change still in flight, and `copy-db` from SQLite. (Everything
both backends share runs on both through the other test files.)"""

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from websockets.sync.client import connect

from coordinator_core.settings import Settings, SettingsError, redact_url
from runner_client import wait_for
from server_process import ROOT, ServerProcess, free_port
from store import changes
from store.postgres import MIGRATIONS, PostgresDatabase
from test_live import recv
from test_sessions import create, event


@pytest.fixture
def pg_url(postgres_database) -> str:
    return postgres_database.fresh_schema()


def command(env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m coordinator ...` with `env` added; a server that starts instead of failing is
    stopped after 30 s."""
    return subprocess.run([sys.executable, "-m", "coordinator", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=30)


# -- configuration ------------------------------------------------------------------------


def test_the_url_selects_postgresql_from_the_variable_or_a_file(tmp_path):
    assert Settings.from_env({}).database_url is None
    url = "postgresql://coordinator:s3cret@db.example:5433/coordinator?sslmode=require"
    assert Settings.from_env({"COORDINATOR_DATABASE_URL": f" {url}\n"}).database_url == url
    (tmp_path / "url").write_text(url + "\n")
    settings = Settings.from_env({"COORDINATOR_DATABASE_URL_FILE": str(tmp_path / "url")})
    assert settings.database_url == url
    assert settings.database_name == (
        "COORDINATOR_DATABASE_URL (postgresql://coordinator:***@db.example:5433/coordinator?sslmode=require)"
    )


@pytest.mark.parametrize("env, message", [
    ({"COORDINATOR_DATABASE_URL": "mysql://u:s3cret@h/db"},
     "COORDINATOR_DATABASE_URL='mysql://u:***@h/db': must be a PostgreSQL URL"),
    ({"COORDINATOR_DATABASE_URL": "postgresql://u@h/db", "COORDINATOR_DATABASE_URL_FILE": "/x"},
     "COORDINATOR_DATABASE_URL and COORDINATOR_DATABASE_URL_FILE are both set: use one"),
    ({"COORDINATOR_DATABASE_URL_FILE": "/nonexistent/url"},
     "COORDINATOR_DATABASE_URL_FILE='/nonexistent/url': cannot read"),
    ({"COORDINATOR_DATABASE_URL": "postgresql://u@h/db", "DATABASE_MAX_MB": "5"},
     "DATABASE_MAX_MB caps the SQLite file"),
])
def test_unusable_configuration_names_the_variable(env, message):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    assert message in str(refused.value) and "s3cret" not in str(refused.value)


def test_passwords_never_shown():
    assert redact_url("postgresql://u:p@h/db") == "postgresql://u:***@h/db"
    assert redact_url("postgresql://u@h/db?password=p&sslmode=disable") == (
        "postgresql://u@h/db?password=***&sslmode=disable")
    assert redact_url("postgresql:///db?host=/run/pg") == "postgresql:///db?host=/run/pg"


def test_psycopg_is_imported_only_with_a_url():
    probe = ("import sys, coordinator, store.backend, store.retention;"
             " coordinator.create_app(coordinator.Settings()); print('psycopg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# -- start-up faults ----------------------------------------------------------------------


def test_unreachable_server_stops_the_start_with_one_line(tmp_path):
    port = free_port()  # nothing listens there
    done = command({"AGENT_ORCHESTRATOR_PROJECT_DIR": str(tmp_path),
                    "COORDINATOR_DATABASE_URL": f"postgresql://coordinator:s3cret@127.0.0.1:{port}/coordinator"},
                   "--host", "127.0.0.1", "--port", "0")
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"agent-coordinator: cannot use the database COORDINATOR_DATABASE_URL"
                           f" (postgresql://coordinator:***@127.0.0.1:{port}/coordinator): connection failed")
    assert "Connection refused" in line and "s3cret" not in line
    assert not (tmp_path / ".agent-orchestrator" / "observability.db").exists()


def test_database_of_a_newer_release_is_refused_unchanged(tmp_path, pg_url):
    PostgresDatabase(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE coordinator_schema SET version = 99")
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone()
    done = command({"AGENT_ORCHESTRATOR_PROJECT_DIR": str(tmp_path), "COORDINATOR_DATABASE_URL": pg_url},
                   "--host", "127.0.0.1", "--port", "0")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"agent-coordinator: cannot use the database COORDINATOR_DATABASE_URL ({redact_url(pg_url)}): its schema"
        f" version 99 is newer than this release knows ({len(MIGRATIONS)}): it was written by a newer release"
    ]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM coordinator_schema").fetchone() == (99,)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone() == tables


# -- the change-log tail ------------------------------------------------------------------


class Tail:
    """A PostgresDatabase following its change log, noting every cursor handed over."""

    def __init__(self, url: str):
        self.db = PostgresDatabase(url)
        self.cursors: list[int] = []
        self.start = self.db.start_changes(lambda batch: self.cursors.extend(c.cursor for c in batch))

    def saw_position(self, cursor: int) -> bool:
        """Whether the tail has read the sequence at or past `cursor` (and so seen its commit)."""
        tail = self.db._tail
        try:
            return tail.cursor >= cursor or any(position >= cursor for position, _ in list(tail._waiting_pairs))
        except RuntimeError:  # the tail changed its pairs while they were read
            return False


def record(conn: psycopg.Connection) -> int:
    return conn.execute("INSERT INTO changes (type, payload) VALUES ('test', '{}') RETURNING id").fetchone()[0]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_tail_never_passes_a_change_still_in_flight(pg_url, outcome):
    tail = Tail(pg_url)
    try:
        with psycopg.connect(pg_url) as early, psycopg.connect(pg_url, autocommit=True) as late:
            held = record(early)  # its transaction stays open
            after = record(late)
            assert after > held
            wait_for(lambda: tail.saw_position(after), "the tail to see the later commit")
            time.sleep(0.05)  # a few more of its rounds
            assert tail.cursors == [] and tail.db._tail.cursor < held
            getattr(early, outcome)()
            wait_for(lambda: after in tail.cursors, "the later change handed over")
        assert tail.cursors == ([held, after] if outcome == "commit" else [after])
    finally:
        tail.db.close()


def test_tail_hands_over_every_change_of_concurrent_writers_in_order(pg_url):
    tail = Tail(pg_url)
    try:
        def write(n: int) -> None:
            with psycopg.connect(pg_url) as conn:
                for i in range(60):
                    record(conn)
                    if i % 3 == 0:
                        conn.rollback()  # cursors burnt, never committed
                    else:
                        conn.commit()

        writers = [threading.Thread(target=write, args=(n,)) for n in range(6)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        stored = tail.db.read_sync(lambda conn: [row[0] for row in conn.execute("SELECT id FROM changes ORDER BY id")])
        assert len(stored) == 6 * 40
        wait_for(lambda: len(tail.cursors) >= len(stored), "every change handed over")
        assert tail.cursors == stored
    finally:
        tail.db.close()


def test_a_write_returns_once_its_change_is_handed_over(pg_url):
    tail = Tail(pg_url)
    try:
        for n in range(20):
            cursor = tail.db.write_sync(lambda conn: changes.record(conn, "test", None, {"n": n}))
            assert tail.cursors[-1] == cursor
    finally:
        tail.db.close()


# -- what PostgreSQL cannot hold ----------------------------------------------------------


def test_text_with_nul_characters(server, backend):
    """SQLite stores it; PostgreSQL's text cannot hold NUL and answers 400, storing nothing.
    (Inside JSON fields NUL is an escape, `\\u0000`, which both store.)"""
    create(server, "s")
    r = server.post("/sessions/s/events", event("s", tool_name="a\u0000b"))
    if backend == "sqlite":
        assert r.status_code == 200
    else:
        assert r.status_code == 400
        assert r.json()["detail"].startswith("The database cannot take this request: ")
    ok = server.post("/sessions/s/events", event("s", tool_input={"k": "a\u0000b"}))
    assert ok.status_code == 200
    stored = server.get("/sessions/s/events").json()["events"]
    assert stored[-1]["tool_input"] == {"k": "a\u0000b"}
    assert len(stored) == (2 if backend == "sqlite" else 1)


# -- copy-db ------------------------------------------------------------------------------


def fill_sqlite(project_dir: Path) -> dict:
    """A SQLite database with some of everything, written by a real server; returns what its
    routes answered."""
    with ServerProcess(project_dir, RUNNER_POLL_TIMEOUT="0.2", RUN_RECOVERY_MODE="none") as server:
        for sid in ("a", "b", "gone", "parent"):
            create(server, sid)
        server.post("/sessions", json={"session_id": "child", "parent_session_id": "parent"})
        for n in range(5):
            server.post("/sessions/a/events", event("a", tool_input={"n": n, "text": "é\u0000"}))
        server.post("/sessions/gone/events", event("gone"))
        assert server.delete("/sessions/gone").status_code == 200  # the watermark moves
        server.post("/sessions/a/events", {**event("a", reason="open"), "model": "m", "usage": {"tokens": 3}})
        asked = {"session_id": "b", "tool_name": "Bash", "tool_input": {"c": "ls"}}
        approval = server.post("/approvals", asked).json()["approval"]
        server.post(f"/approvals/{approval['approval_id']}", {"decision": "allow", "reason": "fine"})
        server.post("/sessions/a/events", event("a", "session_stop"))
        runner = server.post("/runner/register", {"hostname": "h", "project_dir": "/p", "executor_type": "x"}).json()
        server.post("/runs", {"type": "start_session", "prompt": "go"})
        server.post("/runs", {"type": "resume_session", "session_id": "b", "prompt": "again"})
        claimed = server.get(f"/runner/runs?runner_id={runner['runner_id']}").json()["run"]
        server.post(f"/runs/{claimed['run_id']}/stop")
        return answers(server)


def answers(server) -> dict:
    paths = ("/sessions", "/sessions/a/events", "/runs", "/events/b", "/approvals")
    got = {path: server.get(path).json() for path in paths}
    runners = server.get("/runners").json()["runners"]
    got["/runners"] = [{k: v for k, v in r.items() if k != "seconds_since_heartbeat"} for r in runners]
    with connect(server.url.replace("http", "ws") + "/ws?since=0") as ws:
        got["init"] = recv(ws)
        got["replay"] = []
        try:
            while True:
                got["replay"].append(json.loads(ws.recv(timeout=1)))
        except TimeoutError:  # the whole log was replayed
            pass
    return got


def test_copy_db_moves_everything_and_clients_carry_on(tmp_path, pg_url):
    project = tmp_path / "project"
    before = fill_sqlite(project)
    assert before["replay"][0] == {"type": "replay_gap", "since": 0, "earliest": 1, "cursor": 0}
    assert len(before["replay"]) == 18 and len(before["/sessions/a/events"]["events"]) == 7
    assert before["/sessions/a/events"]["events"][-2]["usage"] == {"tokens": 3}  # an open event's own keys
    assert [a["status"] for a in before["/approvals"]["approvals"]] == ["decided"]

    done = command({"AGENT_ORCHESTRATOR_PROJECT_DIR": str(project)}, "copy-db", "--to", pg_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"copied {project}/.agent-orchestrator/observability.db to {redact_url(pg_url)}:"
                                  " 5 sessions, 7 events, 2 runs, 1 runners, 1 runner_stops")
    assert done.stdout.rstrip().endswith(" 1 approvals")

    with ServerProcess(project, COORDINATOR_DATABASE_URL=pg_url, RUNNER_POLL_TIMEOUT="0.2",
                       RUN_RECOVERY_MODE="none") as server:
        after = answers(server)
        assert after == before
        # Ids and cursors go on where SQLite's stopped.
        newest = max(frame["cursor"] for frame in before["replay"])
        with connect(server.url.replace("http", "ws") + f"/ws?since={newest}") as ws:
            recv(ws)
            server.post("/sessions/b/events", event("b"))
            live = recv(ws)
        assert live["type"] == "event" and live["cursor"] > newest
        assert server.get("/sessions/b/events").json()["events"][-1]["id"] == live["cursor"]

    refused = command({"AGENT_ORCHESTRATOR_PROJECT_DIR": str(project)}, "copy-db", "--to", pg_url)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        "agent-coordinator: copy-db refused: the target database is not empty (sessions, events, runs, runners,"
        " runner_stops, changes, approvals): copy into an empty database"
    ]


def test_copy_db_without_a_source_or_with_a_bad_target(tmp_path, pg_url):
    missing = command({"AGENT_ORCHESTRATOR_PROJECT_DIR": str(tmp_path)}, "copy-db", "--to", pg_url)
    assert (missing.returncode, missing.stderr.splitlines()) == (1, [
        f"agent-coordinator: copy-db refused: there is no SQLite database at"
        f" {tmp_path}/.agent-orchestrator/observability.db"
    ])
    bad = command({"AGENT_ORCHESTRATOR_PROJECT_DIR": str(tmp_path)}, "copy-db", "--to", "sqlite:///x.db")
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "agent-coordinator: copy-db --to 'sqlite:///x.db': must be a PostgreSQL URL:"
        " postgresql://user@host:port/database"
    ]


def test_an_id_too_long_to_index_is_refused_not_a_server_fault(server, backend):
    """PostgreSQL cannot index a text of more than about 8 kB (compressed); SQLite stores it."""
    r = server.post("/sessions", {"session_id": secrets.token_hex(15_000)})
    if backend == "postgres":
        assert r.status_code == 400 and r.json()["detail"].startswith("The database cannot take this request")
        assert server.get("/sessions").json() == {"sessions": []}
    else:
        assert r.status_code == 200
