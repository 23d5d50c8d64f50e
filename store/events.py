"""Event verbs. JSON fields are stored as JSON text exactly as sent (falsy values included)
and listed by SQLite itself as one JSON array, so reads never decode and re-encode them."""

from __future__ import annotations

import apsw
import msgspec

from models import Event, Session
from store.errors import NotFound, Rejected
from store.sessions import SESSION_NOT_FOUND, get_session, update_session

_encode = msgspec.json.encode

_INSERT = (
    "INSERT INTO events (session_id, event_type, timestamp, tool_name, tool_input, tool_output,"
    " error, exit_code, reason, role, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# One event as a JSON object, keys in wire order; json() embeds stored JSON text as JSON.
_EVENT_JSON = (
    "json_object('id', id, 'session_id', session_id, 'event_type', event_type,"
    " 'timestamp', timestamp, 'tool_name', tool_name, 'tool_input', json(tool_input),"
    " 'tool_output', json(tool_output), 'error', error, 'exit_code', exit_code,"
    " 'reason', reason, 'role', role, 'content', json(content))"
)


def _json_or_null(value) -> str | None:
    return None if value is None else _encode(value).decode()


def _insert(conn: apsw.Connection, event: Event) -> int:
    conn.execute(
        _INSERT,
        (
            event.session_id,
            event.event_type,
            event.timestamp,
            event.tool_name,
            _json_or_null(event.tool_input),
            _json_or_null(event.tool_output),
            event.error,
            event.exit_code,
            event.reason,
            event.role,
            _json_or_null(event.content),
        ),
    )
    return conn.last_insert_rowid()


def append_event(conn: apsw.Connection, session_id: str, event: Event) -> tuple[int, Session | None]:
    """Store an event of an existing session. A `session_stop` finishes the session: then the
    updated session is returned with the new event id (else None)."""
    if get_session(conn, session_id) is None:
        raise NotFound(SESSION_NOT_FOUND)
    if event.session_id != session_id:
        raise Rejected("Event session_id must match URL session_id")
    finished = update_session(conn, session_id, status="finished") if event.event_type == "session_stop" else None
    return _insert(conn, event), finished


def append_legacy_event(conn: apsw.Connection, event: Event) -> int:
    """The legacy route: `session_start` creates or revives the session as `running`,
    `session_stop` finishes it; any other event needs an existing session."""
    if event.event_type == "session_start":
        conn.execute(
            "INSERT INTO sessions (session_id, status, created_at) VALUES (?, 'running', ?)"
            " ON CONFLICT (session_id) DO UPDATE SET status = 'running'",
            (event.session_id, event.timestamp),
        )
    elif get_session(conn, event.session_id) is None:
        raise NotFound(SESSION_NOT_FOUND)
    elif event.event_type == "session_stop":
        update_session(conn, event.session_id, status="finished")
    return _insert(conn, event)


def list_events_json(
    conn: apsw.Connection,
    session_id: str,
    after: int | None = None,
    limit: int | None = None,
    require_session: bool = False,
) -> str:
    """A session's events as a JSON array: all of them by (timestamp, id), or, when paging,
    those with id > `after`, ascending by id, at most `limit`. NotFound for an unknown
    session if `require_session`."""
    if require_session and get_session(conn, session_id) is None:
        raise NotFound(SESSION_NOT_FOUND)
    if after is None and limit is None:
        sql = f"SELECT json_group_array({_EVENT_JSON} ORDER BY timestamp, id) FROM events WHERE session_id = ?"
        return conn.execute(sql, (session_id,)).fetchone()[0]
    sql = (
        f"SELECT json_group_array(json(e) ORDER BY id) FROM"
        f" (SELECT id, {_EVENT_JSON} AS e FROM events WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?)"
    )
    return conn.execute(sql, (session_id, after or 0, -1 if limit is None else limit)).fetchone()[0]


def newest_event_id(conn: apsw.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]


# An event as broadcast (`Event` order, no id), for replaying to live subscribers.
_EVENT_DATA_JSON = (
    "json_object('event_type', event_type, 'session_id', session_id, 'timestamp', timestamp,"
    " 'tool_name', tool_name, 'tool_input', json(tool_input), 'tool_output', json(tool_output),"
    " 'error', error, 'exit_code', exit_code, 'reason', reason, 'role', role,"
    " 'content', json(content))"
)


def replay_page(conn: apsw.Connection, after: int, session_id: str | None, limit: int) -> list[tuple[int, str]]:
    """Up to `limit` events with id > `after` (of one session if given) as (id, data JSON)."""
    if session_id is None:
        sql = f"SELECT id, {_EVENT_DATA_JSON} FROM events WHERE id > ? ORDER BY id LIMIT ?"
        return conn.execute(sql, (after, limit)).fetchall()
    sql = f"SELECT id, {_EVENT_DATA_JSON} FROM events WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?"
    return conn.execute(sql, (session_id, after, limit)).fetchall()


def max_deleted_event_id(conn: apsw.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'max_deleted_event_id'").fetchone()
    return row[0] if row else 0
