"""Session verbs."""

from __future__ import annotations

import msgspec

from store.backend import Connection
from store.changes import record, record_session
from store.errors import Conflict, NotFound, Rejected
from store.models import SESSION_COLUMNS, Session
from store.stamps import now_ts

SESSION_NOT_FOUND = "Session not found"


def get_session(conn: Connection, session_id: str) -> Session | None:
    row = conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
    return Session(*row) if row else None


def require_session(conn: Connection, session_id: str) -> Session:
    session = get_session(conn, session_id)
    if session is None:
        raise NotFound(SESSION_NOT_FOUND)
    return session


def list_sessions(conn: Connection, status: str | None = None, limit: int | None = None) -> list[Session]:
    """Newest first (`created_at` DESC, string order); optionally one status and the first N."""
    where = "WHERE status = ?" if status is not None else ""
    params = (status,) if status is not None else ()
    sql = f"SELECT {SESSION_COLUMNS} FROM sessions {where} ORDER BY created_at DESC, session_id"
    if limit is not None:
        sql, params = sql + " LIMIT ?", (*params, limit)
    return [Session(*row) for row in conn.execute(sql, params)]


def list_sessions_json(conn: Connection, status: str | None = None, limit: int | None = None) -> bytes:
    """`list_sessions` as the answer of `GET /sessions`: `{"sessions": [...]}`."""
    return msgspec.json.encode({"sessions": list_sessions(conn, status, limit)})


def create_session(
    conn: Connection,
    session_id: str,
    *,
    project_dir: str | None = None,
    agent_name: str | None = None,
    parent_session_id: str | None = None,
    execution_mode: str = "sync",
    duplicate_detail: str = "Session already exists",
) -> Session:
    """Insert a `pending` session (announced); Conflict if the id exists, NotFound for an
    unknown parent. The insert itself gives way to one that commits first (PostgreSQL writes
    run side by side): that too is a Conflict."""
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
    inserted = conn.execute(
        f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({', '.join('?' * 11)})"
        " ON CONFLICT (session_id) DO NOTHING RETURNING session_id",
        tuple(getattr(session, f) for f in Session.__struct_fields__),
    ).fetchone()
    if inserted is None:
        raise Conflict(duplicate_detail)
    return record_session(conn, "session_created", session)


def update_session(conn: Connection, session_id: str, **fields) -> Session:
    """Set the given columns (None values are skipped) and return the row; NotFound if absent."""
    changes = {k: v for k, v in fields.items() if v is not None}
    if changes:
        assignments = ", ".join(f"{column} = ?" for column in changes)
        conn.execute(f"UPDATE sessions SET {assignments} WHERE session_id = ?", (*changes.values(), session_id))
    return require_session(conn, session_id)


def update_metadata(conn: Connection, session_id: str, **fields) -> Session:
    """`update_session`, announced."""
    return record_session(conn, "session_updated", update_session(conn, session_id, **fields))


def bind_session(
    conn: Connection,
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


def delete_session(conn: Connection, session_id: str) -> int:
    """Delete a session with its events and runs (children keep living, parentless).
    Returns how many events went with it."""
    require_session(conn, session_id)
    events = conn.execute("SELECT count(*) FROM events WHERE session_id = ?", (session_id,)).fetchone()[0]
    remove_session(conn, session_id)
    return events


def remove_session(conn: Connection, session_id: str) -> None:
    """Delete the row (its events, runs and their changes cascade) and the rest of its change
    log, which leaves `session_deleted` as all there is to replay of it."""
    conn.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
    conn.execute("DELETE FROM changes WHERE session_id = ?", (session_id,))
    record(conn, "session_deleted", session_id, {"session_id": session_id})


def session_result(conn: Connection, session_id: str) -> str:
    """The text of the first block of the newest assistant message (by timestamp). The content
    is decoded here, not by the database's JSON functions: they differ between the backends."""
    session = require_session(conn, session_id)
    if session.status != "finished":
        raise Rejected("Session not finished")
    row = conn.execute(
        "SELECT content FROM events"
        " WHERE session_id = ? AND event_type = 'message' AND role = 'assistant'"
        " ORDER BY timestamp DESC, id DESC LIMIT 1",
        (session_id,),
    ).fetchone()
    blocks = msgspec.json.decode(row[0]) if row and row[0] is not None else None
    text = blocks[0].get("text") if isinstance(blocks, list) and blocks and isinstance(blocks[0], dict) else None
    if not isinstance(text, str):
        raise NotFound("No result found")
    return text
