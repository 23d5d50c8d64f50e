"""Event verbs. JSON fields are stored as JSON text exactly as sent (falsy values included)
and spliced into answers as they are (msgspec.Raw), so reads never decode and re-encode them."""

from __future__ import annotations

import apsw
import msgspec

from models import EVENT_COLUMNS, Event, EventRow, Session, StoredEvent
from store.errors import NotFound, Rejected
from store.sessions import SESSION_NOT_FOUND, get_session, update_session

_encode = msgspec.json.encode
STORED_COLUMNS = ", ".join(StoredEvent.__struct_fields__)

_INSERT = (
    "INSERT INTO events (session_id, event_type, timestamp, tool_name, tool_input, tool_output,"
    " error, exit_code, reason, role, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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


def _raw(text: str | None) -> msgspec.Raw | None:
    return None if text is None else msgspec.Raw(text.encode())


def _json_columns_raw(row: tuple) -> tuple:
    """A row of `id` and the event columns (EventRow or StoredEvent order: both have the JSON
    columns at 5, 6 and 11) with its JSON text wrapped to be spliced verbatim."""
    return (*row[:5], _raw(row[5]), _raw(row[6]), *row[7:11], _raw(row[11]))


def _events_document(rows) -> bytes:
    """The answer of the event list routes: `{"events": [...]}`."""
    return _encode({"events": [EventRow(*_json_columns_raw(row)) for row in rows]})


def session_events_json(conn: apsw.Connection, session_id: str) -> bytes | None:
    """All of a session's events, by (timestamp, id), as `{"events": [...]}`; None for an
    unknown session."""
    if get_session(conn, session_id) is None:
        return None
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE session_id = ? ORDER BY timestamp, id"
    return _events_document(conn.execute(sql, (session_id,)))


def events_page_json(
    conn: apsw.Connection, session_id: str, after: int | None, limit: int | None, require_session: bool
) -> bytes:
    """A session's events with id > `after`, ascending by id, at most `limit`, as
    `{"events": [...]}`. NotFound for an unknown session if `require_session`."""
    if require_session and get_session(conn, session_id) is None:
        raise NotFound(SESSION_NOT_FOUND)
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?"
    return _events_document(conn.execute(sql, (session_id, after or 0, -1 if limit is None else limit)))


def newest_event_id(conn: apsw.Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]


def replay_page(conn: apsw.Connection, after: int, session_id: str | None, limit: int) -> list[tuple[int, bytes]]:
    """Up to `limit` events with id > `after` (of one session if given) as (id, event JSON
    as broadcast, without the id)."""
    where = "id > ?" if session_id is None else "session_id = ? AND id > ?"
    params = (after,) if session_id is None else (session_id, after)
    sql = f"SELECT id, {STORED_COLUMNS} FROM events WHERE {where} ORDER BY id LIMIT ?"
    rows = conn.execute(sql, (*params, limit))
    return [(id_, _encode(StoredEvent(*fields))) for id_, *fields in map(_json_columns_raw, rows)]


def max_deleted_event_id(conn: apsw.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'max_deleted_event_id'").fetchone()
    return row[0] if row else 0
