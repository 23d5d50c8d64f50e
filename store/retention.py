"""Retention: sessions that are over (`finished` or `stopped`) and older than the configured age
are deleted with their events and runs (the foreign keys cascade), a small batch per write so
that other writers never wait long behind a purge.

On SQLite the freed pages stay in the database file and are reused for new rows: the file stops
growing rather than shrinking. (Incremental auto-vacuum cannot be turned on for an existing
database without a full VACUUM, which would block every writer while it rewrites the file.) On
PostgreSQL, autovacuum makes the space reusable in the same way.
"""

from __future__ import annotations

import logging

import anyio

from store.backend import Connection, Database
from store.sessions import remove_session
from store.stamps import now_ts

log = logging.getLogger("coordinator.retention")

BATCH_SESSIONS = 100
BATCH_EVENTS = 20_000  # a batch ends early once its sessions hold this many events
LEADER_CHECK = 5.0  # seconds between looks at leadership while another process leads

# Oldest first; a session with an unfinished run or a queued callback is not over yet.
_CANDIDATES = """
SELECT s.session_id, (SELECT count(*) FROM events e WHERE e.session_id = s.session_id)
FROM sessions s
WHERE s.status IN ('finished', 'stopped') AND s.created_at < ?
  AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.session_id = s.session_id
                  AND r.status NOT IN ('completed', 'failed', 'stopped'))
  AND NOT EXISTS (SELECT 1 FROM callbacks c WHERE c.parent_session_id = s.session_id)
ORDER BY s.created_at, s.session_id
LIMIT ?
"""


def delete_expired_sessions(
    conn: Connection, cutoff: str, max_sessions: int = BATCH_SESSIONS, max_events: int = BATCH_EVENTS
) -> list[str]:
    """Delete one batch of finished or stopped sessions created before `cutoff` (a server
    timestamp): at most `max_sessions`, and no more than `max_events` events unless a single
    session holds more. Returns the ids deleted, oldest first; empty when none is left."""
    chosen: list[str] = []
    events = 0
    for session_id, count in conn.execute(_CANDIDATES, (cutoff, max_sessions)).fetchall():
        if chosen and events + count > max_events:
            break
        chosen.append(session_id)
        events += count
    for session_id in chosen:
        remove_session(conn, session_id)
    return chosen


async def purge(db: Database, days: float) -> int:
    """One pass: delete, batch after batch (each its own write), every session older than
    `days` that is over. Returns the count. The cutoff is fixed for the pass, so the pass ends."""
    cutoff = now_ts(-days * 86400)
    total = 0
    while batch := await db.write(delete_expired_sessions, cutoff):
        total += len(batch)
    return total


async def run_periodically(db: Database, days: float, interval: float) -> None:
    """A pass now and then every `interval` seconds, for the app's lifetime, by the leader of
    the processes serving the database (`Database.leader`: on SQLite, the one process). A
    failed pass is logged and tried again at the next interval: retention must never take the
    server down."""
    while True:
        if not db.leader:
            await anyio.sleep(min(interval, LEADER_CHECK))
            continue
        try:
            deleted = await purge(db, days)
            if deleted:
                log.info("retention: deleted %d sessions older than %g days", deleted, days)
        except Exception:
            log.exception("retention pass failed; trying again in %g s", interval)
        await anyio.sleep(interval)
