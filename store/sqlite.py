"""The SQLite backend, through APSW: connection policy, schema migrations, one writer thread,
pooled readers, and the read cache.

Every write goes through the single writer thread. It drains whatever writes are queued into one
`BEGIN IMMEDIATE` transaction (should one fail, the batch runs again with each write in its own
savepoint, so that the failure rolls back only that write), commits, and only then resolves the
callers: a caller that got an answer knows its data is committed (group commit: many writes
share one fsync). Reads run on per-thread connections in anyio's worker threads, each inside its
own read transaction (a consistent snapshot in WAL mode). Answers that are read often and change
rarely are kept in a `ReadCache` that the writer clears as it commits changes to their rows (see
`store.cache`). The writer hands the changes of each commit, in commit order, to the
`start_changes` handler: one writer commits one transaction after another, so cursor order is
commit order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import anyio
import apsw

from store import changes
from store.cache import ReadCache, changed_keys, install_triggers, take_changed_keys
from store.errors import DatabaseTooNew, StorageFailed, StorageFull

log = logging.getLogger("coordinator.store")

T = TypeVar("T")
Verb = Callable[..., T]

BUSY_TIMEOUT_MS = 5000
MAX_BATCH = 256

# Schema version N is reached by running MIGRATIONS[:N]. The first one is the reference
# schema, written with IF NOT EXISTS so that a reference database opens unchanged.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS sessions (
        session_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        project_dir TEXT,
        agent_name TEXT,
        last_resumed_at TEXT,
        parent_session_id TEXT REFERENCES sessions(session_id) ON DELETE SET NULL,
        execution_mode TEXT DEFAULT 'sync',
        executor_session_id TEXT,
        executor_type TEXT,
        hostname TEXT
    );
    CREATE INDEX IF NOT EXISTS idx_sessions_executor_session_id ON sessions(executor_session_id);
    CREATE INDEX IF NOT EXISTS idx_sessions_hostname ON sessions(hostname);
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        timestamp TEXT NOT NULL,
        tool_name TEXT,
        tool_input TEXT,
        tool_output TEXT,
        error TEXT,
        exit_code INTEGER,
        reason TEXT,
        role TEXT,
        content TEXT,
        FOREIGN KEY (session_id) REFERENCES sessions(session_id) ON DELETE CASCADE
    );
    CREATE INDEX IF NOT EXISTS idx_events_session ON events(session_id, timestamp DESC);
    CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        type TEXT NOT NULL,
        agent_name TEXT,
        prompt TEXT NOT NULL,
        project_dir TEXT,
        parent_session_id TEXT,
        execution_mode TEXT NOT NULL DEFAULT 'sync',
        demands TEXT,
        status TEXT NOT NULL DEFAULT 'pending',
        runner_id TEXT,
        error TEXT,
        created_at TEXT NOT NULL,
        claimed_at TEXT,
        started_at TEXT,
        completed_at TEXT,
        timeout_at TEXT,
        FOREIGN KEY (session_id) REFERENCES sessions(session_id) ON DELETE CASCADE
    );
    CREATE INDEX IF NOT EXISTS idx_runs_session_id ON runs(session_id);
    CREATE INDEX IF NOT EXISTS idx_runs_status ON runs(status);
    CREATE INDEX IF NOT EXISTS idx_runs_runner_id ON runs(runner_id);
    CREATE INDEX IF NOT EXISTS idx_runs_status_created ON runs(status, created_at);
    """,
    # Cursor paging of one session's events by id.
    """
    CREATE INDEX IF NOT EXISTS idx_events_session_id ON events(session_id, id);
    """,
    # The newest deleted event id, kept by a trigger (cascades and retention included), so a
    # live subscriber resuming from an older cursor learns that it cannot get everything back.
    """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TRIGGER IF NOT EXISTS events_deleted_watermark AFTER DELETE ON events BEGIN
        INSERT INTO meta (key, value) VALUES ('max_deleted_event_id', OLD.id)
        ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value);
    END;
    """,
    # Runner registrations, stop commands and callback state: durable, so that runners and
    # queued work survive a coordinator restart.
    """
    CREATE TABLE IF NOT EXISTS runners (
        runner_id TEXT PRIMARY KEY,
        registered_at TEXT NOT NULL,
        last_heartbeat TEXT NOT NULL,
        hostname TEXT NOT NULL,
        project_dir TEXT NOT NULL,
        executor_type TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        status TEXT NOT NULL DEFAULT 'online',
        deregistering INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS runner_stops (
        runner_id TEXT NOT NULL REFERENCES runners(runner_id) ON DELETE CASCADE,
        run_id TEXT NOT NULL,
        PRIMARY KEY (runner_id, run_id)
    );
    CREATE TABLE IF NOT EXISTS callbacks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        parent_session_id TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
        child_session_id TEXT NOT NULL,
        failed INTEGER NOT NULL,
        text TEXT
    );
    CREATE INDEX IF NOT EXISTS idx_callbacks_parent ON callbacks(parent_session_id, id);
    CREATE TABLE IF NOT EXISTS callbacks_in_flight (
        session_id TEXT PRIMARY KEY REFERENCES sessions(session_id) ON DELETE CASCADE
    );
    """,
    # A counter bumped by every change to `sessions`, so the full session list can be served
    # from a cache until it changes.
    """
    CREATE TRIGGER IF NOT EXISTS sessions_inserted AFTER INSERT ON sessions BEGIN
        INSERT INTO meta (key, value) VALUES ('sessions_version', 1)
        ON CONFLICT (key) DO UPDATE SET value = value + 1;
    END;
    CREATE TRIGGER IF NOT EXISTS sessions_updated AFTER UPDATE ON sessions BEGIN
        INSERT INTO meta (key, value) VALUES ('sessions_version', 1)
        ON CONFLICT (key) DO UPDATE SET value = value + 1;
    END;
    CREATE TRIGGER IF NOT EXISTS sessions_deleted AFTER DELETE ON sessions BEGIN
        INSERT INTO meta (key, value) VALUES ('sessions_version', 1)
        ON CONFLICT (key) DO UPDATE SET value = value + 1;
    END;
    """,
    # The session list cache moved to memory (store.cache): the counter has no reader left.
    """
    DROP TRIGGER IF EXISTS sessions_inserted;
    DROP TRIGGER IF EXISTS sessions_updated;
    DROP TRIGGER IF EXISTS sessions_deleted;
    DELETE FROM meta WHERE key = 'sessions_version';
    """,
    # The change log (store.changes). Its ids continue the events' (an event's cursor is its
    # id), the events already stored are its first rows, so cursors handed out before keep
    # resuming; the deleted-events watermark becomes the log's.
    """
    CREATE TABLE changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        session_id TEXT,
        payload TEXT
    );
    CREATE INDEX idx_changes_session ON changes(session_id, id);
    INSERT INTO changes (id, type, session_id) SELECT id, 'event', session_id FROM events;
    DELETE FROM sqlite_sequence WHERE name = 'changes';
    INSERT INTO sqlite_sequence (name, seq) SELECT 'changes', max(
        coalesce((SELECT max(id) FROM events), 0),
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0));
    INSERT INTO meta (key, value) SELECT 'max_deleted_change', coalesce(
        (SELECT value FROM meta WHERE key = 'max_deleted_event_id'), 0);
    DELETE FROM meta WHERE key = 'max_deleted_event_id';
    DROP TRIGGER events_deleted_watermark;
    -- Plain statements only: a trigger's conflict clause gives way to the firing statement's.
    CREATE TRIGGER events_deleted_changes AFTER DELETE ON events BEGIN
        DELETE FROM changes WHERE id = OLD.id;
        UPDATE meta SET value = max(value, OLD.id) WHERE key = 'max_deleted_change';
    END;
    CREATE TRIGGER changes_deleted_watermark AFTER DELETE ON changes BEGIN
        UPDATE meta SET value = max(value, OLD.id) WHERE key = 'max_deleted_change';
    END;
    """,
    # Open events: the keys a client sent beyond the known ones, as one JSON object (NULL: none).
    # Approvals: tool calls held for a person's decision, kept as their audit trail.
    """
    ALTER TABLE events ADD COLUMN extra TEXT;
    CREATE TABLE approvals (
        approval_id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        source TEXT NOT NULL,
        hook_event_name TEXT,
        tool_name TEXT NOT NULL,
        tool_input TEXT,
        tool_use_id TEXT,
        agent_id TEXT,
        agent_type TEXT,
        requested_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        status TEXT NOT NULL,
        decision TEXT,
        reason TEXT,
        decided_by TEXT,
        decided_at TEXT
    );
    CREATE INDEX idx_approvals_status ON approvals(status, expires_at);
    CREATE INDEX idx_approvals_requested ON approvals(requested_at);
    """,
]


class Connection(apsw.Connection):
    """APSW's connection runs the verbs' SQL as it is (see `store.backend.Connection`); here
    are the statements that differ on PostgreSQL."""

    def claim(self, run_id: str, runner_id: str, claimed_at: str, columns: str) -> tuple | None:
        # One writer: nobody else can claim between this read of `pending` and the update.
        return self.execute(
            f"UPDATE runs SET status = 'claimed', runner_id = ?, claimed_at = ?"
            f" WHERE run_id = ? AND status = 'pending' RETURNING {columns}",
            (runner_id, claimed_at, run_id),
        ).fetchone()


def connect(path: Path | str) -> Connection:
    """Open a connection with the project's policy: WAL, FKs on, a real busy timeout, and
    synchronous=FULL so that a commit survives a power loss as well as a process crash."""
    conn = Connection(str(path))
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migrate(conn: Connection) -> int:
    """Bring the schema to the newest version; returns the version reached. A database of a
    newer release is refused (DatabaseTooNew) before anything is written to it."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise DatabaseTooNew(
            f"its schema version {version} is newer than this release knows ({len(MIGRATIONS)}):"
            " it was written by a newer release"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        with conn:
            conn.execute(script)
            conn.execute(f"PRAGMA user_version={number}")
        log.info("database schema migrated to version %d", number)
    return len(MIGRATIONS)


class _Write:
    """A queued write. Its outcome goes to `future`: an asyncio future, settled on `loop`, for
    `write`; a concurrent.futures.Future (loop None) for `submit` from other threads."""

    __slots__ = ("fn", "args", "kwargs", "future", "loop")

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, loop: asyncio.AbstractEventLoop | None = None):
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.loop = loop
        self.future = concurrent.futures.Future() if loop is None else loop.create_future()

    def claim(self) -> bool:
        """False if the caller gave up (was cancelled) before the write started: then nothing is
        written, as it got no answer. A claimed concurrent future can no longer be cancelled."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()


def _settle(outcomes: list[tuple[_Write, Any, BaseException | None]]) -> None:
    for job, result, error in outcomes:
        if job.future.cancelled():  # an asyncio caller cancelled while its write ran
            continue
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)


def _storage_error(exc: Exception) -> Exception:
    """A full disk (or size cap) and other I/O errors as the store errors answered 507 and 503;
    anything else as it is."""
    if isinstance(exc, apsw.FullError):
        return StorageFull("Storage full: nothing was stored; retry once space is freed")
    if isinstance(exc, apsw.IOError):
        return StorageFailed(f"Storage error ({exc}): nothing was stored; retry later")
    return exc


def _cap_size(conn: Connection, megabytes: float) -> None:
    """DATABASE_MAX_MB: SQLite refuses to grow the file past `max_page_count` pages (SQLITE_FULL,
    answered 507). The setting holds for the connection: the writer's, the only one that writes."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={max(1, int(megabytes * 1024 * 1024) // page_size)}")


class SqliteDatabase:
    """`store.backend.Database` on one SQLite file: `await db.write(verb, ...)` and
    `await db.read(verb, ...)` run a verb on the right connection and thread."""

    def __init__(self, path: Path | str, cache_bytes: int = 32 * 1024 * 1024, max_mb: float = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_conn = connect(self.path)
        migrate(self._writer_conn)
        install_triggers(self._writer_conn)
        if max_mb:
            _cap_size(self._writer_conn, max_mb)
        self.cache = ReadCache(cache_bytes)
        self._writes: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._readers: list[Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()
        # Called with (verb name, seconds from queuing to commit) after each `write`; metrics.
        self.on_write: Callable[[str, float], None] | None = None
        # Called in the writer thread with the changes of each commit, in commit order.
        self.on_commit: Callable[[list[changes.Change]], None] | None = None

    # -- writes -------------------------------------------------------------------------

    async def write(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        """Run a write verb in the writer thread; returns once its transaction is committed."""
        started = time.perf_counter()
        job = _Write(fn, args, kwargs, asyncio.get_running_loop())
        self._writes.put(job)
        try:
            return await job.future
        finally:
            if self.on_write is not None:
                self.on_write(getattr(fn, "__name__", "unnamed"), time.perf_counter() - started)

    def submit(self, fn: Verb[T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """`write` for callers outside the event loop: the future resolves once committed."""
        job = _Write(fn, args, kwargs)
        self._writes.put(job)
        return job.future

    def write_sync(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        return self.submit(fn, *args, **kwargs).result()

    def _write_loop(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    job = self._writes.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Write]) -> None:
        batch = [job for job in batch if job.claim()]
        if not batch:
            return
        conn = self._writer_conn
        changed: list[str] = []
        committed: list[changes.Change] = []
        try:
            outcomes = self._attempt(conn, batch, isolated=False)
            if outcomes is None:  # one failed: again, each write undone on its own if it fails
                outcomes = self._attempt(conn, batch, isolated=True)
            changed = take_changed_keys(conn)
            conn.execute("COMMIT")
            committed = changes.take()
        except Exception as exc:  # the transaction itself failed: nothing in it is committed
            error = _storage_error(exc)
            if error is exc:  # unexpected: a bug, worth its traceback
                log.exception("write transaction failed")
            else:  # the disk's fault, said in one line
                log.error("a write transaction failed, nothing stored (%d writes): %s", len(batch), exc)
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            changes.take()
            outcomes = [(job, None, error) for job in batch]
            changed = []
        self.cache.drop(changed_keys(changed, committed))  # before any caller hears of the commit
        if committed and self.on_commit is not None:
            self.on_commit(committed)  # in commit order: this thread commits one batch at a time
        # One wake-up per event loop for the whole batch; asyncio futures are only settled there.
        by_loop: dict[asyncio.AbstractEventLoop | None, list] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, settled in by_loop.items():
            if loop is None:
                _settle(settled)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                    loop.call_soon_threadsafe(_settle, settled)

    def _attempt(
        self, conn: Connection, batch: list[_Write], isolated: bool
    ) -> list[tuple[_Write, Any, BaseException | None]] | None:
        """Run the writes in a new transaction, left open for the commit. Not `isolated`: one
        after another, or None once one fails (the transaction is rolled back); nearly every
        batch passes, and two statements per write are saved. `isolated`: each in a savepoint,
        so that a failing write is undone alone and answered with its error."""
        conn.execute("BEGIN IMMEDIATE")
        changes.collect()
        outcomes: list[tuple[_Write, Any, BaseException | None]] = []
        for job in batch:
            if isolated:
                conn.execute("SAVEPOINT write")
                mark = changes.mark()
            try:
                outcomes.append((job, job.fn(conn, *job.args, **job.kwargs), None))
            except Exception as exc:
                if conn.get_autocommit():  # SQLite rolled back the whole transaction (disk full...)
                    raise
                if not isolated:
                    conn.execute("ROLLBACK")
                    changes.take()
                    return None
                conn.execute("ROLLBACK TO write")
                changes.rollback_to(mark)
                error = _storage_error(exc)
                if error is not exc:
                    log.error("a write was not stored: %s", exc)
                outcomes.append((job, None, error))
            if isolated:
                conn.execute("RELEASE write")
        return outcomes

    # -- reads --------------------------------------------------------------------------

    def _reader(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def read_sync(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            return fn(conn, *args, **kwargs)
        finally:
            conn.execute("COMMIT")

    async def read(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        """Run a read verb on a worker thread's own connection, in one snapshot."""
        return await anyio.to_thread.run_sync(functools.partial(self.read_sync, fn, *args, **kwargs))

    async def read_cached(self, key: str, fn: Verb[bytes | None], *args: Any) -> bytes | None:
        """`read` for an encoded answer that `key` names in the cache: served from memory while
        its rows are unchanged. None (the verb found nothing to answer with) is not kept."""
        value = self.cache.get(key)
        if value is not None:
            return value
        token = self.cache.start_fill(key)
        try:
            value = await self.read(fn, *args)
        finally:
            self.cache.fill(key, token, value)  # still None if the read failed
        return value

    # -- the change log -----------------------------------------------------------------

    def start_changes(self, handler: Callable[[list[changes.Change]], None]) -> int:
        """From the next commit on, the writer hands each commit's changes to `handler`. Set in
        the writer thread, so no commit falls between the cursor returned and the handler."""

        def follow(conn: Connection) -> int:
            self.on_commit = handler
            return changes.newest(conn)

        return self.write_sync(follow)

    # -- the other processes: none ------------------------------------------------------

    shared = False
    leader = True

    def join(self, wake: Callable[[str | None], None]) -> bool:
        return True

    def signal_wake(self, target: str | None) -> None:
        pass

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Finish every queued write, then close all connections."""
        self._writes.put(None)
        self._writer.join()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._writer_conn.close()
