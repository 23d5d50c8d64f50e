"""Run verbs: the queue (create, claim, stop), stop commands for runners, timeouts, recovery.

Runs are listed and claimed in one order, (`created_at`, `run_id`) ascending: the timestamps have
a fixed format, so string order is time order and the queue is FIFO across restarts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from store.backend import Connection
from store.changes import record, record_session
from store.errors import NotFound, Rejected
from store.models import RUN_COLUMNS, Run, Runner, Session
from store.sessions import create_session, get_session, require_session, update_metadata
from store.stamps import new_run_id, now_ts

RUN_NOT_FOUND = "Run not found"
PROPERTIES = ("hostname", "project_dir", "executor_type")
# Recovery: a claim or start older than this is taken as lost when the coordinator restarts.
RECOVERY_AGE_SECONDS = 300
RUNNER_GONE = "Runner no longer registered"

_decode = msgspec.json.decode
_encode = msgspec.json.encode


# -- demands ------------------------------------------------------------------------------


def merge_demands(blueprint: dict[str, Any] | None, additional: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each property is the blueprint's if truthy, else the additional one; tags are the union.
    None when nothing is demanded. Only set properties are kept; `tags` is always there."""
    blueprint, additional = blueprint or {}, additional or {}
    merged = {key: blueprint.get(key) or additional.get(key) for key in PROPERTIES}
    merged = {key: value for key, value in merged.items() if value is not None}
    tags = list(dict.fromkeys([*(blueprint.get("tags") or ()), *(additional.get("tags") or ())]))
    if not merged and not tags:
        return None
    return {**merged, "tags": tags}


def demands_met(demands: dict[str, Any] | None, runner: Runner) -> bool:
    """Truthy properties must equal the runner's; demanded tags must all be the runner's."""
    if not demands:
        return True
    if any(demands.get(key) and demands[key] != getattr(runner, key) for key in PROPERTIES):
        return False
    return set(demands.get("tags") or ()) <= set(runner.tags)


# -- rows ---------------------------------------------------------------------------------


def _run(row: tuple) -> Run:
    run = Run(*row)
    if run.demands is not None:
        run.demands = _decode(run.demands)
    return run


def insert_run(conn: Connection, run: Run) -> Run:
    values = [getattr(run, field) for field in Run.__struct_fields__]
    values[Run.__struct_fields__.index("demands")] = None if run.demands is None else _encode(run.demands).decode()
    conn.execute(f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
    return run


def new_run(session_id: str, type_: str, prompt: str, **fields: Any) -> Run:
    """A fresh `pending` run; `fields` sets the optional columns."""
    defaults = dict.fromkeys(Run.__struct_fields__) | {"execution_mode": "sync"}
    return Run(**defaults | fields | {
        "run_id": new_run_id(),
        "type": type_,
        "session_id": session_id,
        "prompt": prompt,
        "status": "pending",
        "created_at": now_ts(),
    })


def get_run(conn: Connection, run_id: str) -> Run | None:
    row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return _run(row) if row else None


def require_run(conn: Connection, run_id: str) -> Run:
    run = get_run(conn, run_id)
    if run is None:
        raise NotFound(RUN_NOT_FOUND)
    return run


def list_runs(conn: Connection, status: str | None = None) -> list[Run]:
    """Every run (terminal ones too), oldest first; optionally only one status."""
    where = "WHERE status = ?" if status is not None else ""
    sql = f"SELECT {RUN_COLUMNS} FROM runs {where} ORDER BY created_at, run_id"
    return [_run(row) for row in conn.execute(sql, (status,) if status is not None else ())]


def create_run(
    conn: Connection,
    run: Run,
    *,
    no_match_timeout: float,
) -> tuple[Run, Session | None]:
    """Queue a run with its demands in one go, so no runner can claim it unconstrained.

    A start run creates its `pending` session first (returned, to be announced); a resume run
    needs an existing session and takes its agent and project unless the request named them.
    """
    session = None
    if run.type == "start_session":
        session = create_session(
            conn,
            run.session_id,
            project_dir=run.project_dir,
            agent_name=run.agent_name,
            parent_session_id=run.parent_session_id,
            execution_mode=run.execution_mode,
            duplicate_detail=f"Session '{run.session_id}' already exists",
        )
    else:
        existing = require_session(conn, run.session_id)
        run.agent_name = run.agent_name or existing.agent_name
        run.project_dir = run.project_dir or existing.project_dir
    if run.demands is not None:
        run.timeout_at = now_ts(no_match_timeout)
    return insert_run(conn, run), session


# -- claiming -----------------------------------------------------------------------------


def claim_run(conn: Connection, runner: Runner) -> Run | None:
    """Claim the oldest pending run whose demands the runner meets (others are skipped, so
    an unmatched run never blocks the queue). The claim is conditional on `pending` and made by
    the backend (`Connection.claim`), so a run is claimed once however many runners try."""
    pending = conn.execute("SELECT run_id, demands FROM runs WHERE status = 'pending' ORDER BY created_at, run_id")
    for run_id, demands in list(pending):
        if not demands_met(None if demands is None else _decode(demands), runner):
            continue
        if row := conn.claim(run_id, runner.runner_id, now_ts(), RUN_COLUMNS):
            return _run(row)
    return None


def requeue_unstarted(conn: Connection, older_than: float) -> list[str]:
    """Runs claimed more than `older_than` seconds ago and never reported started are `pending`
    again (runner and `claimed_at` cleared); returns their ids. For several processes on one
    database: a process that dies between committing a claim and answering the poll leaves a
    claim its runner never got."""
    rows = conn.execute(
        "UPDATE runs SET status = 'pending', runner_id = NULL, claimed_at = NULL"
        " WHERE status = 'claimed' AND claimed_at < ? RETURNING run_id",
        (now_ts(-older_than),),
    ).fetchall()
    return sorted(run_id for (run_id,) in rows)


def unclaim_run(conn: Connection, run_id: str, runner_id: str) -> bool:
    """Give back a claim whose runner never got the answer; True if the run is pending again."""
    conn.execute(
        "UPDATE runs SET status = 'pending', runner_id = NULL, claimed_at = NULL"
        " WHERE run_id = ? AND runner_id = ? AND status = 'claimed'",
        (run_id, runner_id),
    )
    return conn.changes() > 0


# -- stop commands ------------------------------------------------------------------------


def queue_stops(conn: Connection, runner_id: str, run_ids: list[str]) -> bool:
    """Queue stop commands for a runner (duplicates collapse); False if it is not registered."""
    if conn.execute("SELECT 1 FROM runners WHERE runner_id = ?", (runner_id,)).fetchone() is None:
        return False
    conn.executemany(
        "INSERT INTO runner_stops (runner_id, run_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
        [(runner_id, run_id) for run_id in run_ids],
    )
    return True


def take_stops(conn: Connection, runner_id: str) -> list[str]:
    """The runner's queued stop commands, oldest first (`rowid`: SQLite's own, a column on
    PostgreSQL); the queue is emptied."""
    rows = conn.execute(
        "DELETE FROM runner_stops WHERE runner_id = ? RETURNING run_id, rowid", (runner_id,)
    ).fetchall()
    return [run_id for run_id, _ in sorted(rows, key=lambda row: row[1])]


# -- stopping -----------------------------------------------------------------------------


class Stopped(NamedTuple):
    """What a stop request did: the reply, the session to announce, the runner to wake."""

    reply: dict[str, Any]
    session: Session | None = None
    runner_id: str | None = None


def set_session_status(conn: Connection, session_id: str, status: str) -> Session | None:
    """Set an existing session's status, announced."""
    return update_metadata(conn, session_id, status=status) if get_session(conn, session_id) else None


def finish_run(conn: Connection, run_id: str, status: str, error: str | None = None) -> None:
    conn.execute(
        "UPDATE runs SET status = ?, error = coalesce(?, error), completed_at = ? WHERE run_id = ?",
        (status, error, now_ts(), run_id),
    )


def _stop(conn: Connection, run: Run) -> Stopped:
    reply = {"ok": True, "run_id": run.run_id, "session_id": run.session_id}
    if run.status == "pending":
        finish_run(conn, run.run_id, "stopped")
        reply |= {"status": "stopped", "message": "Run cancelled before execution"}
        return Stopped(reply, set_session_status(conn, run.session_id, "stopped"))
    if run.status not in ("claimed", "running"):
        raise Rejected(f"Run cannot be stopped (status: {run.status})")
    if not run.runner_id:
        raise Rejected("Run not claimed by any runner")
    if not queue_stops(conn, run.runner_id, [run.run_id]):
        # Its runner is gone: nobody can stop it any more, so it is over.
        finish_run(conn, run.run_id, "stopped")
        reply |= {"status": "stopped", "message": "Runner no longer registered - run marked as stopped"}
        return Stopped(reply, set_session_status(conn, run.session_id, "stopped"))
    conn.execute("UPDATE runs SET status = 'stopping' WHERE run_id = ?", (run.run_id,))
    reply["status"] = "stopping"
    return Stopped(reply, set_session_status(conn, run.session_id, "stopping"), run.runner_id)


def stop_run(conn: Connection, run_id: str) -> Stopped:
    """POST /runs/{id}/stop: cancel a pending run, or ask its runner to stop a claimed or
    running one (the run and session become `stopping`)."""
    return _stop(conn, require_run(conn, run_id))


def stop_session(conn: Connection, session_id: str) -> Stopped:
    """POST /sessions/{id}/stop: stop the session's newest active run, or settle the session."""
    session = require_session(conn, session_id)
    reply: dict[str, Any] = {"ok": True, "session_id": session_id}
    if session.status == "stopping":
        return Stopped(reply | {"status": "stopping", "message": "Session is already being stopped"})
    if session.status in ("stopped", "finished"):
        return Stopped(reply | {"status": session.status, "message": f"Session already {session.status}"})
    row = conn.execute(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE session_id = ?"
        " AND status IN ('pending', 'claimed', 'running', 'stopping')"
        " ORDER BY created_at DESC, run_id DESC LIMIT 1",
        (session_id,),
    ).fetchone()
    if row is None:
        reply |= {"status": "stopped", "message": "No active run found - session marked as stopped"}
    elif (run := _run(row)).status == "stopping":
        reply |= {"run_id": run.run_id, "status": "stopped",
                  "message": "Run already in stopping state - session marked as stopped"}
    else:
        return _stop(conn, run)
    # Nothing left to stop: the session (pending or running) is over.
    return Stopped(reply, set_session_status(conn, session_id, "stopped"))


# -- background checks and recovery -------------------------------------------------------


def fail_timed_out_runs(conn: Connection) -> list[Run]:
    """Pending runs whose demands no runner met before `timeout_at` fail."""
    rows = conn.execute(
        f"UPDATE runs SET status = 'failed', error = 'No matching runner available within timeout',"
        f" completed_at = :now WHERE status = 'pending' AND timeout_at < :now RETURNING {RUN_COLUMNS}",
        {"now": now_ts()},
    ).fetchall()
    failed = [_run(row) for row in rows]
    for run in failed:
        announce_failed(conn, run)
    return failed


def announce_failed(conn: Connection, run: Run) -> None:
    """`run_failed`, for a run that failed without its runner saying so."""
    record(conn, "run_failed", run.session_id, {"run_id": run.run_id, "error": run.error, "session_id": run.session_id})


def stopping_sessions(conn: Connection) -> list[str]:
    """Sessions being stopped: `stopping` themselves, or with a `stopping` run."""
    rows = conn.execute(
        "SELECT session_id FROM sessions WHERE status = 'stopping'"
        " UNION SELECT session_id FROM runs WHERE status = 'stopping'"
    )
    return [session_id for (session_id,) in rows]


def end_lost_runs(conn: Connection, overdue_sessions: list[str]) -> list[Run]:
    """Runs no report will end: those in flight whose runner is no longer registered become
    `failed` (`stopped` if they were `stopping`), and the `stopping` runs of the
    `overdue_sessions` `stopped`."""
    overdue = f"session_id IN ({', '.join('?' * len(overdue_sessions))})" if overdue_sessions else "FALSE"
    stopping = "status = 'stopping'"
    rows = conn.execute(
        f"UPDATE runs SET status = CASE WHEN {stopping} THEN 'stopped' ELSE 'failed' END,"
        f" error = CASE WHEN {stopping} THEN error ELSE ? END, completed_at = ?"
        f" WHERE status IN ('claimed', 'running', 'stopping')"
        f" AND (runner_id NOT IN (SELECT runner_id FROM runners) OR {stopping} AND {overdue})"
        f" RETURNING {RUN_COLUMNS}",
        (RUNNER_GONE, now_ts(), *overdue_sessions),
    ).fetchall()
    return [_run(row) for row in rows]


def settle_session(conn: Connection, session_id: str) -> Session | None:
    """A session still `pending`, `running` or `stopping` with no run left in flight is
    `stopped`; returns it then."""
    conn.execute(
        "UPDATE sessions SET status = 'stopped' WHERE session_id = :id"
        " AND status IN ('pending', 'running', 'stopping') AND NOT EXISTS (SELECT 1 FROM runs"
        " WHERE session_id = :id AND status IN ('pending', 'claimed', 'running', 'stopping'))",
        {"id": session_id},
    )
    return record_session(conn, "session_updated", require_session(conn, session_id)) if conn.changes() else None


def recover_runs(conn: Connection, mode: str) -> dict[str, int]:
    """Settle the runs a previous process left in flight, per RUN_RECOVERY_MODE (README, "Restarts").

    `stopping` runs get their stop command queued again in every mode, for runners that are
    still registered: the user asked for the stop, and the runner may never have received it.
    """
    conn.execute(
        "INSERT INTO runner_stops (runner_id, run_id) SELECT runner_id, run_id FROM runs"
        " WHERE status = 'stopping' AND runner_id IN (SELECT runner_id FROM runners) ON CONFLICT DO NOTHING"
    )
    counts = {"stops_requeued": conn.changes(), "requeued": 0, "failed": 0, "stopped": 0}
    if mode == "none":
        return counts

    def older(column: str) -> str:
        return "" if mode == "all" else f" AND ({column} IS NULL OR {column} < :cutoff)"

    params = {"now": now_ts(), "cutoff": now_ts(-RECOVERY_AGE_SECONDS)}
    error = {"all": "Coordinator restarted - execution state unknown"}.get(mode, "Coordinator restarted during execution")
    conn.execute(
        "UPDATE runs SET status = 'pending', runner_id = NULL, claimed_at = NULL"
        " WHERE status = 'claimed'" + older("claimed_at"),
        params,
    )
    counts["requeued"] = conn.changes()
    conn.execute(
        "UPDATE runs SET status = 'failed', error = :error, completed_at = :now"
        " WHERE status = 'running'" + older("started_at"),
        params | {"error": error},
    )
    counts["failed"] = conn.changes()
    conn.execute("UPDATE runs SET status = 'stopped', completed_at = :now WHERE status = 'stopping'", params)
    counts["stopped"] = conn.changes()
    return counts
