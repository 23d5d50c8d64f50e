"""The two backends behind one interface: which one a start uses, and what verbs may rely on.

A verb is a plain function taking a `Connection` first. Verbs are written once, in SQLite's
dialect restricted to what PostgreSQL understands the same way (`?` and `:name` placeholders,
`INSERT ... ON CONFLICT`, `RETURNING`, `CASE`; no SQLite-only functions, no JSON operators: JSON
text is decoded in Python). Each backend hands verbs a connection that runs that SQL (SQLite's
APSW connection as it is; on PostgreSQL an adapter that rewrites placeholders) and implements
the few statements that must differ as methods of the same name (`Connection.claim`).

A `Database` runs verbs: `await db.write(verb, ...)` in a transaction that is committed before
it returns, `await db.read(verb, ...)` in one consistent snapshot. `store.sqlite` and
`store.postgres` are the two implementations; nothing imports psycopg unless a PostgreSQL URL
is configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence, TypeVar

from store.errors import DatabaseUnusable

if TYPE_CHECKING:
    from coordinator_core.settings import Settings
    from store.changes import Change

T = TypeVar("T")
Verb = Callable[..., T]


class Connection(Protocol):
    """What a verb may use of its connection, on either backend."""

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        """Run one statement; the result iterates over rows as tuples and has `fetchone()` and
        `fetchall()` (call them only after statements that return rows)."""

    def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> Any: ...

    def changes(self) -> int:
        """Rows inserted, updated or deleted by the last statement."""

    def claim(self, run_id: str, runner_id: str, claimed_at: str, returning: str) -> tuple | None:
        """Claim a run if it is still `pending` (the `returning` columns of the claimed row),
        once only however many claim it at the same time; None if someone else has it."""


class Database(Protocol):
    """Runs verbs on the right connection; see `store.sqlite.SqliteDatabase` and
    `store.postgres.PostgresDatabase`."""

    # Called with (verb name, seconds from the call to the commit) after each `write`; metrics.
    on_write: Callable[[str, float], None] | None

    async def write(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        """Run a write verb in its own transaction; returns once it is committed and its changes
        were handed to the `start_changes` handler."""

    def write_sync(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        """`write` for callers outside the event loop (blocking)."""

    async def read(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T:
        """Run a read verb in one snapshot, on a worker thread."""

    def read_sync(self, fn: Verb[T], *args: Any, **kwargs: Any) -> T: ...

    async def read_cached(self, key: str, fn: Verb[bytes | None], *args: Any) -> bytes | None:
        """`read` of an encoded answer that `key` names in the read cache (where there is one)."""

    def start_changes(self, handler: Callable[[list[Change]], None]) -> int:
        """Hand every change committed from now on to `handler`, in cursor order, from one
        thread; returns the cursor up to which changes were committed before. Blocking."""

    # -- several processes on one database (README, "Running several coordinators") ---------

    # Whether other coordinator processes may serve the same database (PostgreSQL).
    shared: bool

    def join(self, wake: Callable[[str | None], None]) -> bool:
        """Join the processes serving this database: from now on `wake` is called, from another
        thread, with what their `signal_wake` sent (a runner id, None for all, or another
        target such as an approval). Returns
        whether this process is alone; if so, none that starts later is until this one returns
        (start-up recovery runs only then). Blocking."""

    def signal_wake(self, target: str | None) -> None:
        """Tell the other processes to wake who waits for `target` after a commit: a runner's
        polls (None: all runners'), or an approval's waiters; returns at once, the message is
        sent soon after."""

    @property
    def leader(self) -> bool:
        """Whether this process runs the periodic duties (lifecycle checks, retention): one
        process of those serving the database at a time, another once it is gone."""

    def close(self) -> None:
        """Finish the writes in progress, then close every connection."""


def open_database(settings: Settings, cache_bytes: int = 0) -> Database:
    """The backend the settings name: PostgreSQL for a `COORDINATOR_DATABASE_URL`, else the
    SQLite file in the project dir. Opening migrates the schema; a database that cannot be used
    raises DatabaseUnusable (the cause in one line)."""
    if settings.database_url is not None:
        from store.postgres import PostgresDatabase

        return PostgresDatabase(settings.database_url)
    import apsw

    from store.sqlite import SqliteDatabase

    try:
        return SqliteDatabase(settings.db_path, cache_bytes, max_mb=settings.database_max_mb)
    except (OSError, apsw.Error) as exc:
        raise DatabaseUnusable(str(exc)) from exc
