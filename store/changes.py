"""The change log: every change a live subscriber can see, with its cursor, committed with it.

A write verb that makes a visible change calls `record` (or `record_event`) inside its
transaction. The row gets the next id of one sequence shared with the events (an event's cursor
is its event id). Each backend hands the committed rows to the broadcaster in cursor order, never
a row before one with a smaller cursor that may still commit (SQLite: its one writer commits one
transaction after another and hands over each commit's rows, collected here; PostgreSQL: a
tail follows the table, see `store.postgres`); a subscriber that is behind reads them back from
the table (`page`), so a replay and the live stream are one sequence.

An event's row carries no payload: it is the event row of the same id. Deleting events (with
their session, or by retention) deletes their change rows, and a trigger keeps the newest
deleted cursor, so a subscriber resuming from before it is told that part of the log is gone.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import msgspec

from store.backend import Connection
from store.models import Session, StoredEvent

_encode = msgspec.json.encode
_EVENT_FIELDS = ", ".join(f"e.{name}" for name in StoredEvent.__struct_fields__)


class Change(NamedTuple):
    """A committed change: `payload` is the message payload, JSON bytes or (for an event handed
    over in memory) an object encoded only if someone subscribes."""

    cursor: int
    type: str
    session_id: str | None
    payload: Any


# The changes recorded by the open write transaction of this thread (a writer's), or None
# where nobody collects them (a migration, a copy).
_collected = threading.local()


def collect() -> None:
    """Start collecting the changes of a new write transaction."""
    _collected.rows = []


def mark() -> int:
    return len(_collected.rows)


def rollback_to(mark_: int) -> None:
    """Forget what a write rolled back to its savepoint recorded."""
    del _collected.rows[mark_:]


def take() -> list[Change]:
    rows, _collected.rows = _collected.rows, None
    return rows or []


def _keep(change: Change) -> None:
    rows = getattr(_collected, "rows", None)
    if rows is not None:
        rows.append(change)


def record(conn: Connection, type_: str, session_id: str | None, payload: dict[str, Any]) -> int:
    """Append a change to the log of the open transaction; returns its cursor."""
    data = _encode(payload)
    sql = "INSERT INTO changes (type, session_id, payload) VALUES (?, ?, ?) RETURNING id"
    cursor = conn.execute(sql, (type_, session_id, data.decode())).fetchone()[0]
    _keep(Change(cursor, type_, session_id, data))
    return cursor


def record_session(conn: Connection, type_: str, session: Session) -> Session:
    record(conn, type_, session.session_id, {"session": session})
    return session


def record_event(conn: Connection, session_id: str, message: Any) -> int | None:
    """The cursor, and so the id, of an event about to be inserted; `message` is its live payload.
    None (nothing recorded) if its session does not exist: one statement checks and records."""
    sql = ("INSERT INTO changes (type, session_id) SELECT 'event', ?"
           " WHERE EXISTS (SELECT 1 FROM sessions WHERE session_id = ?) RETURNING id")
    row = conn.execute(sql, (session_id, session_id)).fetchone()
    if row is None:
        return None
    _keep(Change(row[0], "event", session_id, message))
    return row[0]


def newest(conn: Connection) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM changes").fetchone()[0]


def max_deleted(conn: Connection) -> int:
    """The newest cursor whose change was deleted (0: none)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'max_deleted_change'").fetchone()
    return row[0] if row else 0


def _raw(text: str | None) -> msgspec.Raw | None:
    return None if text is None else msgspec.Raw(text.encode())


def raw_json_columns(row) -> tuple:
    """Event columns in `StoredEvent` order (or with `id` first, as `EventRow`), with the JSON
    columns wrapped to be spliced verbatim: the stored text is what the client sent."""
    offset = len(row) - len(StoredEvent.__struct_fields__)
    a, b, c = 4 + offset, 5 + offset, 10 + offset
    return (*row[:a], _raw(row[a]), _raw(row[b]), *row[b + 1 : c], _raw(row[c]))


def with_extra(encoded: bytes, extra: str | bytes | None) -> bytes:
    """An encoded event object with the keys its client sent beyond the known ones (`extra`,
    one JSON object) appended after them; unchanged when there were none."""
    if extra is None:
        return encoded
    if isinstance(extra, str):
        extra = extra.encode()
    return encoded[:-1] + b"," + extra[1:]


def stored_event_json(fields, extra: str | None = None) -> bytes:
    """A stored event as broadcast: the received keys, no `id`."""
    return with_extra(_encode(StoredEvent(*raw_json_columns(fields))), extra)


_PAGE = (
    f"SELECT c.id, c.type, c.session_id, c.payload, {_EVENT_FIELDS}, e.extra FROM changes c"
    " LEFT JOIN events e ON c.type = 'event' AND e.id = c.id WHERE {where} ORDER BY c.id"
)


class Page(NamedTuple):
    changes: list[Change]  # payloads as JSON bytes
    complete: bool  # every change up to the bound was read (else: continue after the last)
    max_deleted: int  # `max_deleted` in the same snapshot


def page(conn: Connection, after: int, upto: int, session_id: str | None, max_bytes: int) -> Page:
    """Changes with `after` < cursor <= `upto` (of one session if given), in cursor order, as many
    as fit in `max_bytes` (at least one)."""
    where = "c.id > ? AND c.id <= ?" if session_id is None else "c.session_id = ? AND c.id > ? AND c.id <= ?"
    params = (after, upto) if session_id is None else (session_id, after, upto)
    found: list[Change] = []
    size = 0
    complete = True
    for cursor, type_, sid, payload, *event, extra in conn.execute(_PAGE.format(where=where), params):
        data = b'{"data":%s}' % stored_event_json(event, extra) if type_ == "event" else payload.encode()
        size += len(data)
        if found and size > max_bytes:
            complete = False
            break
        found.append(Change(cursor, type_, sid, data))
    return Page(found, complete, max_deleted(conn))
