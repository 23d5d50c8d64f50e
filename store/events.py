"""Event verbs. JSON fields are stored as JSON text exactly as sent (falsy values included)
and spliced into answers as they are (msgspec.Raw), so reads never decode and re-encode them.
The keys a client sent beyond the known ones (`extra`, one JSON object, or None) are stored
the same way and appended after the known keys wherever the event is given back."""

from __future__ import annotations

import msgspec

from store.backend import Connection
from store.changes import raw_json_columns, record_event, record_session, with_extra
from store.errors import NotFound, Rejected
from store.models import EVENT_COLUMNS, Event, EventRow, Session
from store.sessions import SESSION_NOT_FOUND, get_session, require_session, update_session

_encode = msgspec.json.encode

_INSERT = (
    "INSERT INTO events (id, session_id, event_type, timestamp, tool_name, tool_input, tool_output,"
    " error, exit_code, reason, role, content, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

def _json_or_null(value) -> str | None:
    return None if value is None else _encode(value).decode()


def insert_event(conn: Connection, event: Event, extra: str | None = None) -> int:
    """Store the event under its change-log cursor; the live message carries it as received
    (encoded only if someone subscribes, unless it has extra keys to append). NotFound if its
    session does not exist."""
    message = {"data": event} if extra is None else b'{"data":%s}' % with_extra(_encode(event), extra)
    event_id = record_event(conn, event.session_id, message)
    if event_id is None:
        raise NotFound(SESSION_NOT_FOUND)
    conn.execute(
        _INSERT,
        (
            event_id,
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
            extra,
        ),
    )
    return event_id


def append_event(
    conn: Connection, session_id: str, event: Event, extra: str | None = None
) -> tuple[int, Session | None]:
    """Store an event of an existing session. A `session_stop` finishes the session (announced
    before the event): then the updated session is returned with the new event id (else None)."""
    if event.session_id != session_id:
        require_session(conn, session_id)  # an unknown session is the first thing to say
        raise Rejected("Event session_id must match URL session_id")
    finished = None
    if event.event_type == "session_stop":
        finished = record_session(conn, "session_updated", update_session(conn, session_id, status="finished"))
    return insert_event(conn, event, extra), finished


def append_legacy_event(conn: Connection, event: Event, extra: str | None = None) -> int:
    """The legacy route: `session_start` creates or revives the session as `running`,
    `session_stop` finishes it; any other event needs an existing session."""
    if event.event_type == "session_start":
        conn.execute(
            "INSERT INTO sessions (session_id, status, created_at) VALUES (?, 'running', ?)"
            " ON CONFLICT (session_id) DO UPDATE SET status = 'running' WHERE sessions.status <> 'running'",
            (event.session_id, event.timestamp),
        )
    elif event.event_type == "session_stop":
        update_session(conn, event.session_id, status="finished")
    return insert_event(conn, event, extra)


def _events_document(rows) -> bytes:
    """The answer of the event list routes: `{"events": [...]}` (rows: EVENT_COLUMNS, extra)."""
    events = [with_extra(_encode(EventRow(*raw_json_columns(row[:-1]))), row[-1]) for row in rows]
    return b'{"events":[%s]}' % b",".join(events)


def session_events_json(conn: Connection, session_id: str) -> bytes | None:
    """All of a session's events, by (timestamp, id), as `{"events": [...]}`; None for an
    unknown session."""
    if get_session(conn, session_id) is None:
        return None
    sql = f"SELECT {EVENT_COLUMNS}, extra FROM events WHERE session_id = ? ORDER BY timestamp, id"
    return _events_document(conn.execute(sql, (session_id,)))


def events_page_json(
    conn: Connection, session_id: str, after: int | None, limit: int | None, require_session: bool
) -> bytes:
    """A session's events with id > `after`, ascending by id, at most `limit`, as
    `{"events": [...]}`. NotFound for an unknown session if `require_session`."""
    if require_session and get_session(conn, session_id) is None:
        raise NotFound(SESSION_NOT_FOUND)
    sql = f"SELECT {EVENT_COLUMNS}, extra FROM events WHERE session_id = ? AND id > ? ORDER BY id"
    params: tuple = (session_id, after or 0)
    if limit is not None:
        sql, params = sql + " LIMIT ?", (*params, limit)
    return _events_document(conn.execute(sql, params))
