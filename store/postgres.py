"""The PostgreSQL backend, through psycopg 3 and its connection pool, used synchronously in
anyio's worker threads like the SQLite backend. Imported only when a PostgreSQL URL is set.

Writes run side by side, each in its own SERIALIZABLE transaction on a pooled connection:
PostgreSQL either commits them as if they had run one after another or fails one with a
serialization error, and that write is then run again from the start. So the verbs, written
for SQLite's single writer, mean the same here; a verb must have no effect outside its
connection, since it may run more than once. A write returns once committed (with
`synchronous_commit` at least `on`) and its changes were handed to the broadcaster. Reads run in
a REPEATABLE READ, READ ONLY transaction: one snapshot. There is no read cache on this backend
(README, "Design decisions").

The change log is followed by `ChangeTail`, which explains how it hands over every committed
change in cursor order although transactions commit in any order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import queue
import random
import re
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import anyio
import psycopg
import psycopg.sql
from psycopg import IsolationLevel
from psycopg.errors import DeadlockDetected, DiskFull, ProgramLimitExceeded, SerializationFailure
from psycopg_pool import ConnectionPool

from store import changes
from store.errors import DatabaseTooNew, DatabaseUnusable, Rejected, StorageFailed, StorageFull

log = logging.getLogger("coordinator.store")
_jitter = random.Random()  # its own: the global generator belongs to the application

T = TypeVar("T")
Verb = Callable[..., T]

POOL_SIZE = 10
CONNECT_TIMEOUT = 10  # seconds, to reach the server at all
POOL_TIMEOUT = 10.0  # seconds a verb may wait for a free connection
MAX_ATTEMPTS = 30  # runs of a write that keeps losing serialization conflicts
DELIVERY_WAIT = 5.0  # seconds a write waits for the tail to hand its changes over
CHANNEL = "coordinator_changes"


# -- the SQL that differs ---------------------------------------------------------------------

_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|\?|(?<!:):[A-Za-z_]\w*|%""")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """The verbs' placeholders as psycopg's: `?` -> `%s` and `:name` -> `%(name)s` outside quoted
    text, `%` -> `%%` everywhere (psycopg reads the whole text, quotes or not)."""

    def replace(match: re.Match) -> str:
        token = match.group()
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        if token[0] == ":":
            return f"%({token[1:]})s"
        return token.replace("%", "%%")  # quoted

    return _TOKENS.sub(replace, sql)


class Connection:
    """`store.backend.Connection` on a psycopg connection: the verbs' SQL with its placeholders
    translated, `changes()` from the row count, and the statements that differ from SQLite's."""

    __slots__ = ("raw", "_rowcount")

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw
        self._rowcount = -1

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> psycopg.Cursor:
        cursor = self.raw.execute(translate(sql), params) if params else self.raw.execute(sql)
        self._rowcount = cursor.rowcount
        return cursor

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> psycopg.Cursor:
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), params)
        self._rowcount = cursor.rowcount
        return cursor

    def changes(self) -> int:
        return self._rowcount

    def claim(self, run_id: str, runner_id: str, claimed_at: str, columns: str) -> tuple | None:
        # Writes run side by side: a run that another claim holds (locked, not yet committed)
        # is skipped rather than waited for; one it claimed and committed since this snapshot
        # fails this transaction with a serialization error, and the poll round runs again.
        return self.execute(
            f"UPDATE runs SET status = 'claimed', runner_id = ?, claimed_at = ? WHERE run_id = ("
            f"SELECT run_id FROM runs WHERE run_id = ? AND status = 'pending' FOR UPDATE SKIP LOCKED)"
            f" RETURNING {columns}",
            (runner_id, claimed_at, run_id),
        ).fetchone()


# -- the schema -------------------------------------------------------------------------------

# Schema version N is reached by running MIGRATIONS[:N] (its own numbering: SQLite's migrations
# start from the reference database, these from nothing). Texts compare in byte order (`"C"`),
# as in SQLite: timestamps are ISO text, so that is time order. Every foreign key is deferrable
# for `copy-db`, which copies rows in any order.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE sessions (
        session_id TEXT COLLATE "C" PRIMARY KEY,
        status TEXT COLLATE "C" NOT NULL,
        created_at TEXT COLLATE "C" NOT NULL,
        project_dir TEXT COLLATE "C",
        agent_name TEXT COLLATE "C",
        last_resumed_at TEXT COLLATE "C",
        parent_session_id TEXT COLLATE "C"
            REFERENCES sessions(session_id) ON DELETE SET NULL DEFERRABLE,
        execution_mode TEXT COLLATE "C" DEFAULT 'sync',
        executor_session_id TEXT COLLATE "C",
        executor_type TEXT COLLATE "C",
        hostname TEXT COLLATE "C"
    );
    CREATE INDEX idx_sessions_created ON sessions(created_at DESC, session_id);
    CREATE INDEX idx_sessions_executor_session_id ON sessions(executor_session_id);
    CREATE INDEX idx_sessions_hostname ON sessions(hostname);

    -- The change log (store.changes) and the events share one sequence: an event's id is its
    -- cursor. `change_id()` makes sure the transaction has its id before it takes a cursor, which
    -- the tail relies on (ChangeTail).
    CREATE SEQUENCE changes_id_seq AS bigint;
    CREATE FUNCTION change_id() RETURNS bigint LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_current_xact_id();
        RETURN nextval('changes_id_seq');
    END $$;
    CREATE TABLE changes (
        id BIGINT PRIMARY KEY DEFAULT change_id(),
        type TEXT COLLATE "C" NOT NULL,
        session_id TEXT COLLATE "C",
        payload TEXT
    );
    ALTER SEQUENCE changes_id_seq OWNED BY changes.id;
    CREATE INDEX idx_changes_session ON changes(session_id, id);

    CREATE TABLE events (
        id BIGINT PRIMARY KEY DEFAULT change_id(),
        session_id TEXT COLLATE "C" NOT NULL
            REFERENCES sessions(session_id) ON DELETE CASCADE DEFERRABLE,
        event_type TEXT COLLATE "C" NOT NULL,
        timestamp TEXT COLLATE "C" NOT NULL,
        tool_name TEXT COLLATE "C",
        tool_input TEXT,
        tool_output TEXT,
        error TEXT COLLATE "C",
        exit_code BIGINT,
        reason TEXT COLLATE "C",
        role TEXT COLLATE "C",
        content TEXT
    );
    CREATE INDEX idx_events_session ON events(session_id, timestamp, id);
    CREATE INDEX idx_events_session_id ON events(session_id, id);

    CREATE TABLE runs (
        run_id TEXT COLLATE "C" PRIMARY KEY,
        session_id TEXT COLLATE "C" NOT NULL
            REFERENCES sessions(session_id) ON DELETE CASCADE DEFERRABLE,
        type TEXT COLLATE "C" NOT NULL,
        agent_name TEXT COLLATE "C",
        prompt TEXT NOT NULL,
        project_dir TEXT COLLATE "C",
        parent_session_id TEXT COLLATE "C",
        execution_mode TEXT COLLATE "C" NOT NULL DEFAULT 'sync',
        demands TEXT,
        status TEXT COLLATE "C" NOT NULL DEFAULT 'pending',
        runner_id TEXT COLLATE "C",
        error TEXT COLLATE "C",
        created_at TEXT COLLATE "C" NOT NULL,
        claimed_at TEXT COLLATE "C",
        started_at TEXT COLLATE "C",
        completed_at TEXT COLLATE "C",
        timeout_at TEXT COLLATE "C"
    );
    CREATE INDEX idx_runs_session_id ON runs(session_id);
    CREATE INDEX idx_runs_runner_id ON runs(runner_id);
    CREATE INDEX idx_runs_status_created ON runs(status, created_at, run_id);

    -- `rowid`: insertion order, which the verbs read as SQLite's implicit rowid.
    CREATE TABLE runners (
        rowid BIGSERIAL,
        runner_id TEXT COLLATE "C" PRIMARY KEY,
        registered_at TEXT COLLATE "C" NOT NULL,
        last_heartbeat TEXT COLLATE "C" NOT NULL,
        hostname TEXT COLLATE "C" NOT NULL,
        project_dir TEXT COLLATE "C" NOT NULL,
        executor_type TEXT COLLATE "C" NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        status TEXT COLLATE "C" NOT NULL DEFAULT 'online',
        deregistering INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE runner_stops (
        rowid BIGSERIAL,
        runner_id TEXT COLLATE "C" NOT NULL
            REFERENCES runners(runner_id) ON DELETE CASCADE DEFERRABLE,
        run_id TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (runner_id, run_id)
    );
    CREATE TABLE callbacks (
        id BIGSERIAL PRIMARY KEY,
        parent_session_id TEXT COLLATE "C" NOT NULL
            REFERENCES sessions(session_id) ON DELETE CASCADE DEFERRABLE,
        child_session_id TEXT COLLATE "C" NOT NULL,
        failed INTEGER NOT NULL,
        text TEXT
    );
    CREATE INDEX idx_callbacks_parent ON callbacks(parent_session_id, id);
    CREATE TABLE callbacks_in_flight (
        session_id TEXT COLLATE "C" PRIMARY KEY
            REFERENCES sessions(session_id) ON DELETE CASCADE DEFERRABLE
    );

    -- The newest deleted cursor (a subscriber resuming from before it hears of the gap), kept
    -- as in SQLite: deleting events (cascades, retention) deletes their changes, and deleting
    -- changes raises the watermark.
    CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('max_deleted_change', 0);
    CREATE FUNCTION events_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM changes WHERE id IN (SELECT id FROM gone);
        UPDATE meta SET value = newest FROM (SELECT max(id) AS newest FROM gone) g
        WHERE key = 'max_deleted_change' AND newest > value;
        RETURN NULL;
    END $$;
    CREATE TRIGGER events_deleted AFTER DELETE ON events
        REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION events_deleted();
    CREATE FUNCTION changes_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE meta SET value = newest FROM (SELECT max(id) AS newest FROM gone) g
        WHERE key = 'max_deleted_change' AND newest > value;
        RETURN NULL;
    END $$;
    CREATE TRIGGER changes_deleted AFTER DELETE ON changes
        REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION changes_deleted();

    -- Wakes the tail; delivered when (and only if) the transaction commits.
    CREATE FUNCTION changes_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('coordinator_changes', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER changes_inserted AFTER INSERT ON changes
        FOR EACH STATEMENT EXECUTE FUNCTION changes_inserted();
    """,
    # Open events: the keys a client sent beyond the known ones, as one JSON object (NULL: none).
    # Approvals: tool calls held for a person's decision, kept as their audit trail.
    """
    ALTER TABLE events ADD COLUMN extra TEXT;
    CREATE TABLE approvals (
        approval_id TEXT COLLATE "C" PRIMARY KEY,
        session_id TEXT COLLATE "C" NOT NULL,
        source TEXT COLLATE "C" NOT NULL,
        hook_event_name TEXT COLLATE "C",
        tool_name TEXT COLLATE "C" NOT NULL,
        tool_input TEXT,
        tool_use_id TEXT COLLATE "C",
        agent_id TEXT COLLATE "C",
        agent_type TEXT COLLATE "C",
        requested_at TEXT COLLATE "C" NOT NULL,
        expires_at TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        decision TEXT COLLATE "C",
        reason TEXT COLLATE "C",
        decided_by TEXT COLLATE "C",
        decided_at TEXT COLLATE "C"
    );
    CREATE INDEX idx_approvals_status ON approvals(status, expires_at);
    CREATE INDEX idx_approvals_requested ON approvals(requested_at);
    """,
]


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema to the newest version in one transaction; returns the version reached.
    A database of a newer release is refused (DatabaseTooNew) before anything is written to it;
    coordinators starting at the same time take turns."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('coordinator_schema:' || current_schema()))")
        if conn.execute("SELECT to_regclass('coordinator_schema')").fetchone()[0] is None:
            conn.execute("CREATE TABLE coordinator_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM coordinator_schema").fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise DatabaseTooNew(
                f"its schema version {version} is newer than this release knows ({len(MIGRATIONS)}):"
                " it was written by a newer release"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute(script)
            log.info("database schema migrated to version %d", number)
        if version < len(MIGRATIONS):
            conn.execute("DELETE FROM coordinator_schema")
            conn.execute("INSERT INTO coordinator_schema (version) VALUES (%s)", (len(MIGRATIONS),))
    return len(MIGRATIONS)


def connect(url: str, **kwargs: Any) -> psycopg.Connection:
    return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, **kwargs)


def one_line(exc: BaseException) -> str:
    """libpq's messages span lines (a hint indented below the error)."""
    return " ".join(str(exc).split())


def _configure(conn: psycopg.Connection) -> None:
    """A 2xx means committed: a server set to `synchronous_commit = off` would answer before the
    commit is on disk, so the coordinator's connections raise it to `on` (any stronger setting,
    such as waiting for a standby, is kept)."""
    if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
        conn.execute("SET synchronous_commit = on")
    conn.commit()


@contextlib.contextmanager
def _taking_turns(raw: psycopg.Connection) -> Iterator[None]:
    """For a write running again after a conflict: writes that keep colliding on one hot row
    (the same session upserted by many hook calls) take turns instead of starving each other.
    The lock is the session's, taken in a transaction of its own before the write's begins, so
    the write's snapshot is taken once its turn has come."""
    raw.execute("SELECT pg_advisory_lock(hashtext('coordinator_retry:' || current_schema()))")
    raw.commit()
    try:
        yield
    finally:
        if not raw.broken:  # a broken connection's session, and its lock, are gone
            raw.execute("SELECT pg_advisory_unlock(hashtext('coordinator_retry:' || current_schema()))")
            raw.commit()


def _storage_error(exc: Exception, writing: bool) -> Exception:
    """PostgreSQL's faults as the store errors answered 507, 503 and 400; anything else as it is."""
    if isinstance(exc, DiskFull):
        return StorageFull("Storage full: nothing was stored; retry once space is freed")
    if isinstance(exc, ProgramLimitExceeded):  # e.g. an id too long to index
        return Rejected(f"The database cannot take this request: {one_line(exc)}")
    if isinstance(exc, psycopg.OperationalError):  # the pool's timeout included
        outcome = "nothing was stored; " if writing else ""
        return StorageFailed(f"Storage error ({one_line(exc)}): {outcome}retry later")
    if isinstance(exc, psycopg.DataError):  # e.g. text with NUL characters, which PostgreSQL cannot hold
        return Rejected(f"The database cannot take this request: {one_line(exc)}")
    return exc


class PostgresDatabase:
    """`store.backend.Database` on a PostgreSQL database, named by a libpq URL."""

    def __init__(self, url: str, pool_size: int = POOL_SIZE):
        self.url = url
        self.on_write: Callable[[str, float], None] | None = None
        try:
            with connect(url) as conn:  # its errors say why; a pool's would only time out
                migrate(conn)
        except psycopg.Error as exc:
            raise DatabaseUnusable(one_line(exc)) from exc
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, timeout=POOL_TIMEOUT, configure=_configure,
            kwargs={"connect_timeout": CONNECT_TIMEOUT}, name="coordinator", open=True,
        )
        self._tail: ChangeTail | None = None
        self._peers: Peers | None = None
        # Writes waiting for the tail to hand their changes over: (cursor, loop or None, future).
        self._delivered = 0
        self._waiting: list[tuple[int, asyncio.AbstractEventLoop | None, Any]] = []
        self._lock = threading.Lock()

    # -- writes ---------------------------------------------------------------------------

    async def write(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        """Run a write verb on a worker thread; returns once committed and handed over."""
        started = time.perf_counter()
        try:
            result, cursor = await anyio.to_thread.run_sync(self._transact, fn, args, kwargs)
            if cursor > self._delivered and self._tail is not None:
                future = self._wait_for(cursor, asyncio.get_running_loop())
                with anyio.move_on_after(DELIVERY_WAIT) as waited:
                    await future
                if waited.cancelled_caught:
                    self._late(cursor)
            return result
        finally:
            if self.on_write is not None:
                self.on_write(getattr(fn, "__name__", "unnamed"), time.perf_counter() - started)

    def write_sync(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        result, cursor = self._transact(fn, args, kwargs)
        if cursor > self._delivered and self._tail is not None:
            try:
                self._wait_for(cursor, None).result(DELIVERY_WAIT)
            except concurrent.futures.TimeoutError:
                self._late(cursor)
        return result

    def _transact(self, fn: Verb[T], args: tuple, kwargs: dict) -> tuple[T, int]:
        """Run the verb in a SERIALIZABLE transaction until it commits without a conflict;
        returns its result and the newest cursor it recorded (0: none)."""
        for attempt in itertools.count(1):
            changes.collect()
            try:
                with self._pool.connection() as raw:
                    raw.isolation_level, raw.read_only = IsolationLevel.SERIALIZABLE, False
                    with _taking_turns(raw) if attempt > 1 else contextlib.nullcontext():
                        with raw.transaction():
                            result = fn(Connection(raw), *args, **kwargs)
                recorded = changes.take()
                return result, max((change.cursor for change in recorded), default=0)
            except (SerializationFailure, DeadlockDetected) as exc:
                changes.take()
                if attempt == MAX_ATTEMPTS:
                    log.error("a write gave up after %d serialization conflicts: %s", attempt, one_line(exc))
                    raise StorageFailed("Too many conflicting writes: nothing was stored; retry later") from exc
                time.sleep(_jitter.uniform(0, min(0.02, 0.0005 * 2**attempt)))  # let the winner finish
            except Exception as exc:
                changes.take()
                error = _storage_error(exc, writing=True)
                if error is exc:
                    raise
                if not isinstance(error, Rejected):  # the database's fault, not the request's
                    log.error("a write was not stored: %s", one_line(exc))
                raise error from exc

    # -- reads ----------------------------------------------------------------------------

    def read_sync(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        try:
            with self._pool.connection() as raw:
                raw.isolation_level, raw.read_only = IsolationLevel.REPEATABLE_READ, True
                with raw.transaction():
                    return fn(Connection(raw), *args, **kwargs)
        except Exception as exc:
            error = _storage_error(exc, writing=False)
            if error is exc:
                raise
            raise error from exc

    async def read(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        """Run a read verb on a worker thread, in one snapshot."""
        return await anyio.to_thread.run_sync(functools.partial(self.read_sync, fn, *args, **kwargs))

    async def read_cached(self, key: str, fn: Verb[bytes | None], *args: Any) -> bytes | None:
        """No read cache on this backend: a plain `read`."""
        return await self.read(fn, *args)

    # -- the change log -------------------------------------------------------------------

    def start_changes(self, handler: Callable[[list[changes.Change]], None]) -> int:
        self._tail = ChangeTail(self.url, handler, self._advance)
        return self._tail.start()

    def _wait_for(self, cursor: int, loop: asyncio.AbstractEventLoop | None):
        """A future settled once the tail has handed over every change up to `cursor`."""
        future = loop.create_future() if loop is not None else concurrent.futures.Future()
        with self._lock:
            if cursor <= self._delivered:
                future.set_result(None)
            else:
                self._waiting.append((cursor, loop, future))
        return future

    def _advance(self, cursor: int) -> None:
        """Called by the tail after it handed over everything up to `cursor`."""
        with self._lock:
            self._delivered = cursor
            done = [waiter for waiter in self._waiting if waiter[0] <= cursor]
            self._waiting = [waiter for waiter in self._waiting if waiter[0] > cursor]
        for _, loop, future in done:
            if loop is None:
                future.set_result(None)
            else:
                loop.call_soon_threadsafe(_settle, future)

    def _late(self, cursor: int) -> None:
        log.warning(
            "change %d committed but not handed to live subscribers within %g s: a transaction on the"
            " server is still open (see README, PostgreSQL); answering anyway", cursor, DELIVERY_WAIT,
        )

    # -- the other processes --------------------------------------------------------------

    shared = True

    def join(self, wake: Callable[[str | None], None]) -> bool:
        self._peers = Peers(self.url, wake)
        return self._peers.join()

    def signal_wake(self, target: str | None) -> None:
        if self._peers is not None:
            self._peers.signal(target)

    @property
    def leader(self) -> bool:
        return self._peers is not None and self._peers.leader

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        if self._peers is not None:
            self._peers.close()
        if self._tail is not None:
            self._tail.stop(self._pool)
        self._pool.close()
        with self._lock:  # nobody waits for a tail that is gone
            waiting, self._waiting = self._waiting, []
        for _, loop, future in waiting:
            if loop is None:
                future.set_result(None)
            else:
                loop.call_soon_threadsafe(_settle, future)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


# The snapshot's xmin, and the next transaction id to be assigned. (A snapshot's xmax is not that:
# it is one past the newest *finished* transaction; running ones above it are left out of the
# snapshot. `age()` counts from the next id to be assigned when, as here, the statement has none.)
_XIDS = """
SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint + age(xid(pg_snapshot_xmax(s)))
FROM pg_current_snapshot() s
"""


class ChangeTail:
    """Follows the committed change log and hands it over in cursor order, from one thread.

    Cursors come from a sequence, taken while transactions run side by side, so they do not
    commit in order: the tail may see cursor 11 committed while 10 is still in flight, and must
    not pass 11 before 10 has committed or failed. PostgreSQL's transaction ids tell when that is:

    1. The tail reads the sequence's position L: every cursor up to L has been handed out.
    2. In a later statement it reads N, the next transaction id to be assigned. A transaction
       holding a cursor up to L took it before (1) and had its id before it took the cursor
       (`change_id()` makes sure), so that id is below N.
    3. Once a snapshot's `xmin` (the oldest transaction still in progress) reaches N, every such
       transaction has committed or rolled back: cursors up to L are settled, and the committed
       ones are all visible. The tail reads them (after its cursor, up to L) and hands them
       over; it never passes a row that could still commit.

    Usually the snapshot of (2) finds nothing in progress and L settles at once. Otherwise the
    pair (L, N) waits for later snapshots. (A transaction id kept on each row would not do: a
    transaction may get its id before another and its cursor after it, so a row whose
    transaction is older than every one in progress can still be passed by a cursor in flight.) The tail wakes on LISTEN/NOTIFY (a trigger notifies in every
    transaction that records a change, delivered at its commit), polls while a pair waits for
    transactions that notify nobody (those that record nothing, or roll back), and polls every
    SAFETY_POLL seconds in any case. A transaction left open anywhere on the same server (the
    snapshot is the whole server's) holds live updates back until it ends.
    """

    SAFETY_POLL = 1.0
    FIRST_RETRY = 0.002  # seconds before checking a waiting pair again; doubled up to SAFETY_POLL
    MAX_PAIRS = 64  # beyond, the newest pair replaces the last: it settles later, never wrongly
    PAGE_BYTES = 4 * 1024 * 1024
    START_WAIT = 10.0
    LONG_WAIT = 5.0  # seconds a pair may wait before the log says what holds it

    def __init__(self, url: str, handler: Callable[[list[changes.Change]], None], advanced: Callable[[int], None]):
        self.url = url
        self.handler = handler
        self.advanced = advanced
        self.cursor = 0
        self._waiting_pairs: collections.deque[tuple[int, int]] = collections.deque()  # (L, N)
        self._waiting_since: float | None = None  # when the oldest pair began to wait (for the log)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-change-tail", daemon=True)

    def start(self) -> int:
        """Find the cursor up to which the log is settled (waiting up to START_WAIT for the
        transactions in progress), then follow from there; returns that cursor."""
        with connect(self.url, autocommit=True) as conn:
            deadline = time.monotonic() + self.START_WAIT
            delay = self.FIRST_RETRY
            while (settled := self._settle(conn)) is None:
                if time.monotonic() > deadline:
                    settled = self._waiting_pairs[-1][0]
                    log.warning("following the change log from %d without waiting for the transactions in"
                                " progress on the server: their changes may not reach live subscribers", settled)
                    break
                time.sleep(delay)
                delay = min(delay * 2, self.SAFETY_POLL)
        self.cursor = settled
        self._waiting_pairs.clear()
        self._thread.start()
        return settled

    def stop(self, pool: ConnectionPool) -> None:
        self._stop.set()
        if self._thread.is_alive():
            try:  # wakes the tail from its wait
                with pool.connection() as conn:
                    conn.execute(f"NOTIFY {CHANNEL}")
            except psycopg.Error:
                pass  # it wakes at its next poll
            self._thread.join(timeout=self.SAFETY_POLL + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._follow(conn)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    log.error("following the change log failed (%s); reconnecting", one_line(exc))
            except Exception:  # a bug: live updates must not stop for good
                log.exception("following the change log failed; starting again")
            self._stop.wait(1.0)

    def _follow(self, conn: psycopg.Connection) -> None:
        timeout = 0.0
        while not self._stop.is_set():
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
            if self._stop.is_set():
                return
            settled = self._settle(conn)
            if settled is not None and settled > self.cursor:
                self._hand_over(conn, settled)
            if self._waiting_pairs:
                timeout = min(max(timeout * 2, self.FIRST_RETRY), self.SAFETY_POLL)
            else:
                timeout = self.SAFETY_POLL

    def _settle(self, conn: psycopg.Connection) -> int | None:
        """One check: the newest cursor now known to be settled, or None."""
        last, called = conn.execute("SELECT last_value, is_called FROM changes_id_seq").fetchone()
        handed_out = last if called else last - 1
        xmin, next_xid = conn.execute(_XIDS).fetchone()
        if len(self._waiting_pairs) == self.MAX_PAIRS:
            self._waiting_pairs.pop()
        self._waiting_pairs.append((handed_out, next_xid))
        settled = None
        while self._waiting_pairs and self._waiting_pairs[0][1] <= xmin:
            settled = self._waiting_pairs.popleft()[0]
            self._waiting_since = None
        if self._waiting_pairs:
            now = time.monotonic()
            self._waiting_since = self._waiting_since or now
            if now - self._waiting_since > self.LONG_WAIT:
                log.warning("live updates are held back by transaction %d, open on the database server for over"
                            " %g s", xmin, self.LONG_WAIT)
                self._waiting_since = now
        return settled

    def _hand_over(self, conn: psycopg.Connection, upto: int) -> None:
        """Hand over the committed changes after the cursor up to `upto`, page by page."""
        adapter = Connection(conn)
        while True:
            page = changes.page(adapter, self.cursor, upto, None, self.PAGE_BYTES)
            if page.changes:
                self.handler(page.changes)
            if page.complete:
                break
            self.cursor = page.changes[-1].cursor
        self.cursor = upto
        self.advanced(upto)


# -- the other processes serving the database -------------------------------------------------

WAKE_CHANNEL = "coordinator_dispatch"
# Advisory locks, two-key form: (hash of the schema, which). Every process holds ALIVE shared for
# its lifetime; the one process holding LEADER runs the periodic duties. Locks (and the
# channel) are per schema: services in different schemas of one database are unrelated.
ALIVE, LEADER = 1, 2


class Peers:
    """This process among the coordinators serving one database, on two connections of its own.

    - Alive: every process holds the ALIVE advisory lock shared. One that starts while nobody
      else holds it (an exclusive try succeeds) is alone: start-up recovery is its to run.
    - Leader: the listening connection tries LEADER (exclusive) every LEADER_RETRY seconds until
      it has it, and then holds it for as long as the connection lives. PostgreSQL releases a
      session's locks when it ends, so a process that dies, however it dies, hands leadership
      on within about LEADER_RETRY seconds.
    - Wake-ups: `signal` queues a target (a runner id, `*`: all runners, `approval:<id>`); a sender thread sends the queue with
      `pg_notify` on its own connection, and every other process's listener calls `wake` on
      receipt. A process ignores its own notifications: it woke its polls already.
    """

    LEADER_RETRY = 1.0

    def __init__(self, url: str, wake: Callable[[str | None], None]):
        self.url = url
        self.wake = wake
        self.leader = False
        self._outbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._sender_pid = 0
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="store-peers", daemon=True)
        self._sender = threading.Thread(target=self._send, name="store-peers-notify", daemon=True)
        self._conn: psycopg.Connection | None = None
        self._key = 0
        self._channel = WAKE_CHANNEL

    def join(self) -> bool:
        """Connect, take ALIVE (returning whether this process is alone) and start listening."""
        conn = self._conn = connect(self.url, autocommit=True)
        schema, self._key = conn.execute("SELECT current_schema(), hashtext(current_schema())").fetchone()
        self._channel = f"{WAKE_CHANNEL}/{schema}"[:63]  # longer names are cut by PostgreSQL's LISTEN
        alone = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (self._key, ALIVE)).fetchone()[0]
        # Shared before the exclusive one is let go: no later start sees an empty moment.
        self._attach(conn)
        if alone:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (self._key, ALIVE))
        self._listener.start()
        self._sender.start()
        return alone

    def _attach(self, conn: psycopg.Connection) -> None:
        conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", (self._key, ALIVE))
        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self._channel)))

    def signal(self, target: str | None) -> None:
        self._outbox.put(target or "*")

    def _listen(self) -> None:
        conn = self._conn
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._conn = connect(self.url, autocommit=True)
                    self._attach(conn)
                    self.wake(None)  # notifications may have been missed meanwhile
                if not self.leader:
                    self.leader = conn.execute(
                        "SELECT pg_try_advisory_lock(%s, %s)", (self._key, LEADER)
                    ).fetchone()[0]
                    if self.leader:
                        log.info("this process now runs the periodic duties (leader)")
                for note in conn.notifies(timeout=self.LEADER_RETRY):
                    if note.pid != self._sender_pid and note.payload:
                        self.wake(None if note.payload == "*" else note.payload)
                    if self._stop.is_set():
                        break
            except psycopg.Error as exc:
                if self.leader:
                    log.warning("leadership lost with the connection to the database")
                self.leader = False
                if conn is not None:
                    conn.close()
                conn = self._conn = None
                if self._stop.is_set():
                    return
                log.error("listening to the other coordinators failed (%s); reconnecting", one_line(exc))
                self._stop.wait(1.0)

    def _send(self) -> None:
        conn: psycopg.Connection | None = None
        pending: set[str] = set()
        while True:
            first = self._outbox.get()
            if first is None:
                break
            pending.add(first)
            while not self._outbox.empty():  # one round trip for all queued meanwhile
                item = self._outbox.get()
                if item is None:
                    self._outbox.put(None)
                    break
                pending.add(item)
            try:
                if conn is None:
                    conn = connect(self.url, autocommit=True)
                    self._sender_pid = conn.info.backend_pid
                with conn.transaction():
                    for payload in sorted(pending):
                        conn.execute("SELECT pg_notify(%s, %s)", (self._channel, payload))
                pending.clear()
            except psycopg.Error as exc:
                # Whom it was for polls again within RUNNER_POLL_TIMEOUT and finds what was meant.
                log.error("telling the other coordinators to wake their polls failed: %s", one_line(exc))
                pending.clear()
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # ends the listener's wait (an empty payload)
                conn.execute("SELECT pg_notify(%s, '')", (self._channel,))
            conn.close()

    def close(self) -> None:
        """Send what is queued, then let go of the locks (another process may lead at once)."""
        self._stop.set()
        self._outbox.put(None)
        if self._sender.is_alive():
            self._sender.join(timeout=5)
        if self._listener.is_alive():
            self._listener.join(timeout=self.LEADER_RETRY + 5)
        if self._conn is not None:
            self._conn.close()
        self.leader = False
