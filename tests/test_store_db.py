"""The store's foundation on a real APSW file: schema, migrations, the writer, the readers."""

import concurrent.futures

import apsw
import pytest

from store.sqlite import MIGRATIONS, SqliteDatabase as Database, connect

REFERENCE_DDL = """
CREATE TABLE sessions (session_id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at TEXT NOT NULL,
  project_dir TEXT, agent_name TEXT, last_resumed_at TEXT,
  parent_session_id TEXT REFERENCES sessions(session_id) ON DELETE SET NULL,
  execution_mode TEXT DEFAULT 'sync', executor_session_id TEXT, executor_type TEXT, hostname TEXT);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
  event_type TEXT NOT NULL, timestamp TEXT NOT NULL, tool_name TEXT, tool_input TEXT,
  tool_output TEXT, error TEXT, exit_code INTEGER, reason TEXT, role TEXT, content TEXT,
  FOREIGN KEY (session_id) REFERENCES sessions(session_id) ON DELETE CASCADE);
CREATE INDEX idx_events_session ON events(session_id, timestamp DESC);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, session_id TEXT NOT NULL, type TEXT NOT NULL,
  agent_name TEXT, prompt TEXT NOT NULL, project_dir TEXT, parent_session_id TEXT,
  execution_mode TEXT NOT NULL DEFAULT 'sync', demands TEXT, status TEXT NOT NULL DEFAULT 'pending',
  runner_id TEXT, error TEXT, created_at TEXT NOT NULL, claimed_at TEXT, started_at TEXT,
  completed_at TEXT, timeout_at TEXT,
  FOREIGN KEY (session_id) REFERENCES sessions(session_id) ON DELETE CASCADE);
INSERT INTO sessions (session_id, status, created_at) VALUES ('ses_old', 'finished', '2025-01-01T00:00:00+00:00');
INSERT INTO events (session_id, event_type, timestamp, tool_input) VALUES ('ses_old', 'post_tool', 't', '{"a": 1}');
INSERT INTO runs (run_id, session_id, type, prompt, created_at) VALUES ('run_old', 'ses_old', 'start_session', 'hi', 't');
"""


def _tables(conn):
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table','index')")}


def _count(conn, table):
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "data" / "observability.db")
    yield database
    database.close()


def test_schema_created_with_version_and_pragmas(db):
    conn = connect(db.path)
    assert {"sessions", "events", "runs", "idx_runs_status_created", "idx_events_session"} <= _tables(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopen_is_idempotent(tmp_path):
    path = tmp_path / "x.db"
    Database(path).close()
    again = Database(path)
    try:
        assert again.read_sync(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == len(MIGRATIONS)
    finally:
        again.close()


def test_reference_database_opens_and_migrates_without_loss(tmp_path):
    path = tmp_path / "observability.db"
    conn = apsw.Connection(str(path))
    conn.execute(REFERENCE_DDL)
    conn.close()
    db = Database(path)
    try:
        counts = db.read_sync(lambda c: [_count(c, t) for t in ("sessions", "events", "runs")])
        assert counts == [1, 1, 1]
        assert "idx_events_session_id" in db.read_sync(_tables)
        assert db.read_sync(lambda c: c.execute("SELECT tool_input FROM events").fetchone()[0]) == '{"a": 1}'
    finally:
        db.close()


def _insert_session(conn, session_id):
    conn.execute("INSERT INTO sessions (session_id, status, created_at) VALUES (?, 'pending', 't')", (session_id,))
    return session_id


@pytest.mark.parametrize("batched", [False, True])
def test_failed_write_rolls_back_only_itself(db, batched):
    import threading

    def insert_then_fail(conn):
        _insert_session(conn, "ses_half")
        raise ValueError("boom")

    gate = threading.Event()
    if batched:  # the writer is held while the three queue up: they form one transaction
        held = db.submit(lambda conn: gate.wait(10))
    futures = [db.submit(_insert_session, "ses_a"), db.submit(insert_then_fail), db.submit(_insert_session, "ses_b")]
    gate.set()
    if batched:
        held.result(timeout=10)
    assert futures[0].result() == "ses_a"
    with pytest.raises(ValueError):
        futures[1].result()
    assert futures[2].result() == "ses_b"
    ids = db.read_sync(lambda c: [r[0] for r in c.execute("SELECT session_id FROM sessions ORDER BY 1")])
    assert ids == ["ses_a", "ses_b"]


def test_a_batch_of_failing_writes_commits_nothing_and_the_next_goes_on(db):
    import threading

    def fail(conn, n):
        _insert_session(conn, f"ses_failed{n}")
        raise ValueError(n)

    gate = threading.Event()
    held = db.submit(lambda conn: gate.wait(10))
    failing = [db.submit(fail, n) for n in range(3)]
    gate.set()
    held.result(timeout=10)
    for n, future in enumerate(failing):
        with pytest.raises(ValueError, match=str(n)):
            future.result(timeout=10)
    assert db.write_sync(_insert_session, "ses_next") == "ses_next"
    assert db.read_sync(lambda c: [r[0] for r in c.execute("SELECT session_id FROM sessions")]) == ["ses_next"]


def test_foreign_keys_enforced(db):
    def orphan_event(conn):
        conn.execute("INSERT INTO events (session_id, event_type, timestamp) VALUES ('nope', 'x', 't')")

    with pytest.raises(apsw.ConstraintError):
        db.write_sync(orphan_event)


def test_concurrent_writes_all_committed_and_visible(db):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: db.write_sync(_insert_session, f"ses_{i}"), range(500)))
    assert db.read_sync(_count, "sessions") == 500
    # and durable: a fresh connection sees them after close
    db.close()
    assert _count(connect(db.path), "sessions") == 500
    db.__init__(db.path)  # reopen so the fixture can close it


def test_cancelled_write_is_skipped_and_the_writer_keeps_going(db):
    import threading

    gate = threading.Event()
    blocker = db.submit(lambda conn: gate.wait(10))  # holds the writer
    cancelled = db.submit(_insert_session, "ses_cancelled")
    assert cancelled.cancel()
    gate.set()
    blocker.result(timeout=10)
    assert db.submit(_insert_session, "ses_after").result(timeout=10) == "ses_after"
    ids = db.read_sync(lambda c: [r[0] for r in c.execute("SELECT session_id FROM sessions")])
    assert ids == ["ses_after"]


def test_async_writes_cancelled_before_or_while_running(db):
    import asyncio
    import threading

    import anyio

    gate, running = threading.Event(), threading.Event()
    loop_errors = []

    def held_insert(conn, session_id):
        running.set()
        gate.wait(10)
        return _insert_session(conn, session_id)

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(db.write, held_insert, "ses_running")
            await anyio.to_thread.run_sync(running.wait, 10)
            with anyio.CancelScope() as queued:
                queued.cancel()
                await db.write(_insert_session, "ses_queued")  # queued, cancelled before it starts
            tasks.cancel_scope.cancel()  # too late for the running one: it commits, nobody is told
        gate.set()
        return await db.write(_insert_session, "ses_after")

    assert anyio.run(scenario) == "ses_after"
    ids = db.read_sync(lambda c: [r[0] for r in c.execute("SELECT session_id FROM sessions ORDER BY 1")])
    assert (ids, loop_errors) == (["ses_after", "ses_running"], [])
