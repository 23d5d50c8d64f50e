"""Read answers kept in memory until the rows they were built from change.

The writer connection carries TEMP triggers (they exist on that connection only, and every
write goes through it) that note, inside each write transaction, which cache keys its changes
touch; inserted events are known from their change rows. The writer drops those entries after
COMMIT and before it answers any caller of the batch, so a client that got its 2xx never reads
an answer from before its write.

A read that misses fills the entry only if nothing dropped the key while it ran: an answer
built from an older snapshot is never stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable

import apsw

from store.changes import Change

SESSIONS = "sessions"  # the full session list


def events_key(session_id: str) -> str:
    """The key of one session's full event list (the session's existence included)."""
    return "events/" + session_id


# A session's events change with its event rows and with the session row's own deletion
# (its event list turns into a 404); the session list with any session row. An inserted event
# needs no trigger: each comes with its change row (`store.changes.record_event`), and the
# writer drops the keys of the events it committed (`changed_keys`), at less cost on the
# hottest write.
#
# The keys are added with `WHERE NOT EXISTS`, not `INSERT OR IGNORE`: a conflict clause in a
# trigger gives way to the one of the statement that fired it, so an upsert (`ON CONFLICT DO
# UPDATE`) on sessions would turn a key noted twice in one transaction into a constraint error.
def _note(key_sql: str) -> str:
    return f"INSERT INTO changed_keys SELECT {key_sql} WHERE NOT EXISTS (SELECT 1 FROM changed_keys WHERE key = {key_sql});"


TRIGGERS = f"""
CREATE TEMP TABLE IF NOT EXISTS changed_keys (key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TEMP TRIGGER IF NOT EXISTS cache_event_updated AFTER UPDATE ON main.events BEGIN
    {_note("'events/' || OLD.session_id")}
    {_note("'events/' || NEW.session_id")}
END;
CREATE TEMP TRIGGER IF NOT EXISTS cache_event_deleted AFTER DELETE ON main.events BEGIN
    {_note("'events/' || OLD.session_id")}
END;
CREATE TEMP TRIGGER IF NOT EXISTS cache_session_inserted AFTER INSERT ON main.sessions BEGIN
    {_note("'sessions'")}
END;
CREATE TEMP TRIGGER IF NOT EXISTS cache_session_updated AFTER UPDATE ON main.sessions BEGIN
    {_note("'sessions'")}
END;
CREATE TEMP TRIGGER IF NOT EXISTS cache_session_deleted AFTER DELETE ON main.sessions BEGIN
    {_note("'sessions'")}
    {_note("'events/' || OLD.session_id")}
END;
"""


def install_triggers(conn: apsw.Connection) -> None:
    conn.execute(TRIGGERS)


def take_changed_keys(conn: apsw.Connection) -> list[str]:
    """The keys the triggers noted in the open transaction so far; the list starts over."""
    keys = [key for (key,) in conn.execute("SELECT key FROM temp.changed_keys")]
    if keys:
        conn.execute("DELETE FROM temp.changed_keys")
    return keys


def changed_keys(noted: list[str], committed: Iterable[Change]) -> set[str]:
    """The keys a commit changed: those its triggers noted, and those of the events it inserted."""
    return {*noted, *(events_key(change.session_id) for change in committed if change.type == "event")}


class ReadCache:
    """A byte-bounded LRU of encoded answers; safe to use from the event loop and the writer."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._filling: dict[str, object] = {}  # key -> token of the read that may fill it
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def start_fill(self, key: str) -> object:
        """Call before reading what will fill `key`; pass the token to `fill`."""
        token = object()
        with self._lock:
            self._filling[key] = token
        return token

    def fill(self, key: str, token: object, value: bytes | None) -> None:
        """Store `value` unless the key was dropped since `start_fill` (None: just forget the token)."""
        with self._lock:
            if self._filling.get(key) is not token:
                return
            del self._filling[key]
            if value is None or len(value) > self.max_bytes:
                return
            old = self._entries.pop(key, None)
            self._size += len(value) - (len(old) if old is not None else 0)
            self._entries[key] = value
            while self._size > self.max_bytes:
                self._size -= len(self._entries.popitem(last=False)[1])

    def drop(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._filling.pop(key, None)
                value = self._entries.pop(key, None)
                if value is not None:
                    self._size -= len(value)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._size
