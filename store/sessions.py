"""Session verbs."""

from __future__ import annotations

import apsw
import msgspec

from store.changes import record, record_session
from store.errors import Conflict, NotFound, Rejected
from store.models import SESSION_COLUMNS, Session
from store.stamps import now_ts

SESSION_NOT_FOUND = "Session not found"


def get_session(conn: apsw.Connection, session_id: str) -> Session | None:
    row = conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return Session(*row) if row else None


def require_session(conn: apsw.Connection, session_id: str) -> Session:
    session = get_session(conn, session_id)
    if session is None:
        raise NotFound(SESSION_NOT_FOUND)
    return session


def list_sessions(conn: apsw.Connection, status: str | None = None, limit: int | None = None) -> list[Session]:
    """Newest first (`created_at` DESC, string order); optionally one status and the first N."""
    where = "WHERE status = ?" if status is not None else ""
    params = (status,) if status is not None else ()
    sql = f"SELECT {SESSION_COLUMNS} FROM sessions {where} ORDER BY created_at DESC, session_id LIMIT ?"
    return [Session(*row) for row in conn.execute(sql, (*params, -1 if limit is None else limit))]


def list_sessions_json(conn: apsw.Connection, status: str | None = None, limit: int | None = None) -> bytes:
    """`list_sessions` as the answer of `GET /sessions`: `{"sessions": [...]}`."""
    return msgspec.json.encode({"sessions": list_sessions(conn, status, limit)})


def create_session(
    conn: apsw.Connection,
    session_id: str,
    *,
    project_dir: str | None = None,
    agent_name: str | None = None,
    parent_session_id: str | None = None,
    execution_mode: str = "sync",
    duplicate_detail: str = "Session already exists",
) -> Session:
    """Insert a `pending` session (announced); Conflict if the id exists, NotFound for an
    unknown parent."""
    if get_session(conn, session_id) is not None:
        raise Conflict(duplicate_detail)
    if parent_session_id is not None and get_session(conn, parent_session_id) is None:
        raise NotFound("Parent session not found")
    session = Session(
        session_id=session_id,
        status="pending",
        created_at=now_ts(),
        project_dir=project_dir,
        agent_name=agent_name,
        parent_session_id=parent_session_id,
        execution_mode=execution_mode,
    )
    conn.execute(
        f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({', '.join('?' * 11)})",
        tuple(getattr(session, f) for f in Session.__struct_fields__),
    )
    return record_session(conn, "session_created", session)


def update_session(conn: apsw.Connection, session_id: str, **fields) -> Session:
    """Set the given columns (None values are skipped) and return the row; NotFound if absent."""
    changes = {k: v for k, v in fields.items() if v is not None}
    if changes:
        assignments = ", ".join(f"{column} = ?" for column in changes)
        conn.execute(f"UPDATE sessions SET {assignments} WHERE session_id = ?", (*changes.values(), session_id))
    return require_session(conn, session_id)


def update_metadata(conn: apsw.Connection, session_id: str, **fields) -> Session:
    """`update_session`, announced."""
    return record_session(conn, "session_updated", update_session(conn, session_id, **fields))


def bind_session(
    conn: apsw.Connection,
    session_id: str,
    executor_session_id: str,
    hostname: str,
    executor_type: str,
    project_dir: str | None = None,
) -> Session:
    """An executor took the session: record where it runs; the status becomes `running`."""
    return update_metadata(
        conn,
        session_id,
        executor_session_id=executor_session_id,
        hostname=hostname,
        executor_type=executor_type,
        project_dir=project_dir,
        status="running",
    )


def delete_session(conn: apsw.Connection, session_id: str) -> int:
    """Delete a session with its events and runs (children keep living, parentless).
    Returns how many events went with it."""
    require_session(conn, session_id)
    events = conn.execute("SELECT count(*) FROM events WHERE session_id = ?", (session_id,)).fetchone()[0]
    remove_session(conn, session_id)
    return events


def remove_session(conn: apsw.Connection, session_id: str) -> None:
    """Delete the row (its events, runs and their changes cascade) and the rest of its change
    log, which leaves `session_deleted` as all there is to replay of it."""
    conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
    conn.execute("DELETE FROM changes WHERE session_id = ?", (session_id,))
    record(conn, "session_deleted", session_id, {"session_id": session_id})


def session_result(conn: apsw.Connection, session_id: str) -> str:
    """The text of the first block of the newest assistant message (by timestamp)."""
    session = require_session(conn, session_id)
    if session.status != "finished":
        raise Rejected("Session not finished")
    row = conn.execute(
        "SELECT content ->> '$[0].text' FROM events"
        " WHERE session_id = ? AND event_type = 'message' AND role = 'assistant'"
        " ORDER BY timestamp DESC, id DESC LIMIT 1",
        (session_id,),
    ).fetchone()
    if row is None or not isinstance(row[0], str):
        raise NotFound("No result found")
    return row[0]
