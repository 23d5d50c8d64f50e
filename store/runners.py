"""Runner verbs: the registry, the poll round, and the reports runners send about their runs.

Registrations live in SQLite, so a runner keeps its id across coordinator restarts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, NamedTuple, Sequence

import apsw
import msgspec

from store import callbacks, runs
from store.errors import NotFound
from store.models import Run, Runner, Session
from store.sessions import get_session, update_session
from store.stamps import now_ts, runner_id as derive_runner_id

_COLUMNS = "runner_id, registered_at, last_heartbeat, hostname, project_dir, executor_type, tags, status"
STOPPED = "Session was manually stopped"  # what a parent hears of a stopped child


class UnknownRunner(Exception):
    """The runner id is not registered (answered 401)."""


class DuplicateRunner(Exception):
    """An online runner already has this identity (answered 409 with an object detail)."""

    def __init__(self, runner: Runner):
        super().__init__(runner.runner_id)
        self.detail = {
            "error": "duplicate_runner",
            "message": (
                f"Runner with identity ({runner.hostname}, {runner.project_dir}, {runner.executor_type})"
                f" is already registered and online as {runner.runner_id}"
            ),
            "runner_id": runner.runner_id,
            "hostname": runner.hostname,
            "project_dir": runner.project_dir,
            "executor_type": runner.executor_type,
        }


def _runner(row: tuple) -> Runner:
    *fields, tags, status = row
    age = datetime.now(timezone.utc) - datetime.fromisoformat(fields[2])
    return Runner(*fields, msgspec.json.decode(tags), status, age.total_seconds())


def get_runner(conn: apsw.Connection, runner_id: str) -> Runner | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM runners WHERE runner_id = ?", (runner_id,)).fetchone()
    return _runner(row) if row else None


def require_runner(conn: apsw.Connection, runner_id: str) -> Runner:
    runner = get_runner(conn, runner_id)
    if runner is None:
        raise UnknownRunner(runner_id)
    return runner


def list_runners(conn: apsw.Connection) -> list[Runner]:
    """In registration order (a reconnection keeps its place)."""
    return [_runner(row) for row in conn.execute(f"SELECT {_COLUMNS} FROM runners ORDER BY rowid")]


def register_runner(
    conn: apsw.Connection, hostname: str, project_dir: str, executor_type: str, tags: list[str] | None, since: str
) -> Runner:
    """A new identity registers `online`. A known one reconnects (keeping `registered_at`, its
    tags unless new ones are sent, and its queued stop commands) if it is `stale`, or if it has
    not heartbeated or polled since `since`, the coordinator's start: that registration is left
    from before a restart, and this is its runner started again. Any other is a duplicate."""
    runner_id = derive_runner_id(hostname, project_dir, executor_type)
    existing = get_runner(conn, runner_id)
    now = now_ts()
    tags_json = None if tags is None else msgspec.json.encode(tags).decode()
    if existing is None:
        conn.execute(
            f"INSERT INTO runners ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 'online')",
            (runner_id, now, now, hostname, project_dir, executor_type, tags_json or "[]"),
        )
    elif existing.status == "online" and existing.last_heartbeat >= since:
        raise DuplicateRunner(existing)
    else:
        conn.execute(
            "UPDATE runners SET last_heartbeat = ?, status = 'online', deregistering = 0,"
            " tags = coalesce(?, tags) WHERE runner_id = ?",
            (now, tags_json, runner_id),
        )
    return require_runner(conn, runner_id)


def heartbeat(conn: apsw.Connection, runner_id: str) -> None:
    """Record a sign of life; a `stale` runner is `online` again."""
    conn.execute("UPDATE runners SET last_heartbeat = ?, status = 'online' WHERE runner_id = ?", (now_ts(), runner_id))
    if conn.changes() == 0:
        raise UnknownRunner(runner_id)


def deregister_runner(conn: apsw.Connection, runner_id: str, self_initiated: bool) -> None:
    """A runner shutting down is removed at once (with its stop commands); anyone else only
    flags it, and its next poll tells it to go."""
    if self_initiated:
        conn.execute("DELETE FROM runners WHERE runner_id = ?", (runner_id,))
    else:
        conn.execute("UPDATE runners SET deregistering = 1 WHERE runner_id = ?", (runner_id,))
    if conn.changes() == 0:
        raise NotFound("Runner not found")


def update_lifecycle(
    conn: apsw.Connection, stale_after: float, remove_after: float, since: str
) -> list[str]:
    """Remove runners silent for `remove_after` seconds and mark those silent for `stale_after`
    `stale`; returns the removed ids. Silence is counted from `since` at the earliest (the
    coordinator's start), so time the coordinator was down is not held against a runner."""
    removed = conn.execute(
        "DELETE FROM runners WHERE max(last_heartbeat, ?) <= ? RETURNING runner_id", (since, now_ts(-remove_after))
    ).fetchall()
    conn.execute(
        "UPDATE runners SET status = 'stale' WHERE status = 'online' AND max(last_heartbeat, ?) <= ?",
        (since, now_ts(-stale_after)),
    )
    return [runner_id for (runner_id,) in removed]


def next_for_runner(conn: apsw.Connection, runner_id: str, since: str) -> dict[str, Any] | None:
    """One round of a long-poll, in priority order: queued stop commands, then a pending
    deregistration (the runner is removed), then a claim. None when there is nothing.

    The first poll since `since` (the coordinator's start) records a heartbeat: the runner
    lived through the restart, so its identity is not free for a new registration."""
    runner = require_runner(conn, runner_id)
    if runner.last_heartbeat < since:
        heartbeat(conn, runner_id)
    if stops := runs.take_stops(conn, runner_id):
        return {"stop_runs": stops}
    conn.execute("DELETE FROM runners WHERE runner_id = ? AND deregistering", (runner_id,))
    if conn.changes():
        return {"deregistered": True}
    run = runs.claim_run(conn, runner)
    return {"run": run} if run else None


def create_run_for_waiting(
    conn: apsw.Connection, run: Run, *, no_match_timeout: float, waiting: Sequence[str]
) -> tuple[Run, Session | None, tuple[str, Run] | None]:
    """`runs.create_run`, then, in the same transaction, a claim by the first of the `waiting`
    runners (parked on a poll) that can take a pending run: (runner id, claimed run) comes back
    third, else None. One commit thus queues a run and hands it out."""
    created, session = runs.create_run(conn, run, no_match_timeout=no_match_timeout)
    for runner_id in waiting:
        runner = get_runner(conn, runner_id)
        if runner is not None and (claimed := runs.claim_run(conn, runner)):
            return created, session, (runner_id, claimed)
    return created, session, None


def report(
    conn: apsw.Connection, runner_id: str, run_id: str, status: str, error: str | None = None
) -> tuple[Session | None, Run | None]:
    """Apply a runner's report (`running`, `completed`, `failed` or `stopped`) whatever the
    run's status. Returns the session to announce (a stop ends it) and a callback run if the
    report woke a parent."""
    require_runner(conn, runner_id)
    run = runs.require_run(conn, run_id)
    if status == "running":
        conn.execute("UPDATE runs SET status = 'running', started_at = ? WHERE run_id = ?", (now_ts(), run_id))
        # A resumed child learns its parent now (a started one got it at creation).
        if run.parent_session_id and get_session(conn, run.session_id) and get_session(conn, run.parent_session_id):
            update_session(conn, run.session_id, parent_session_id=run.parent_session_id)
        return None, None
    runs.finish_run(conn, run_id, status, error)
    session = None
    if status == "stopped":
        error = STOPPED
        session = runs.set_session_status(conn, run.session_id, "stopped")
    return session, None if status == "completed" else _tell_parent(conn, run, error)


def _tell_parent(conn: apsw.Connection, run: Run, error: str | None) -> Run | None:
    """A failed or stopped `async_callback` child reports to its parent; returns the parent's
    resume run if one is queued now."""
    if run.parent_session_id and run.execution_mode == "async_callback":
        return callbacks.child_completed(conn, run.parent_session_id, callbacks.Outcome(run.session_id, True, error))
    return None


class Settled(NamedTuple):
    """What `settle_lost_runs` did: runs ended, sessions stopped, parents' resume runs queued."""

    ended: list[Run]
    sessions: list[Session]
    resumed: list[Run]


def settle_lost_runs(conn: apsw.Connection, overdue_sessions: list[str]) -> Settled:
    """End the runs no runner will report on (`runs.end_lost_runs`: their runner is gone, or
    their session has been stopping too long) as the missing report would have, parents
    told; then each of their sessions, and each overdue one, that has nothing left in flight
    and has not finished is `stopped`. Failures and sessions are announced."""
    settled = Settled(runs.end_lost_runs(conn, overdue_sessions), [], [])
    for run in settled.ended:
        if run.status == "failed":
            runs.announce_failed(conn, run)
    for run in settled.ended:
        if resumed := _tell_parent(conn, run, STOPPED if run.status == "stopped" else run.error):
            settled.resumed.append(resumed)
    for session_id in dict.fromkeys([*(run.session_id for run in settled.ended), *overdue_sessions]):
        if session := runs.settle_session(conn, session_id):
            settled.sessions.append(session)
    return settled
