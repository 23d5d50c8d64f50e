"""`copy-db`: the SQLite database copied into an empty PostgreSQL one, ids and cursors kept.

Clients keep working across the move: session, run and event ids are the same, the change log
keeps its cursors (live subscribers resume from theirs), and the sequence they come from goes on
where SQLite's stopped. The source is read in one snapshot (it is first brought to the current
schema, as a start would); the target is written in one transaction, so a failed copy leaves it
empty.
"""

from __future__ import annotations

from pathlib import Path

from store import changes, postgres, sqlite
from store.models import APPROVAL_COLUMNS, EVENT_COLUMNS, RUN_COLUMNS, SESSION_COLUMNS

# Every table and the columns copied. Runners and stop commands are ordered by SQLite's implicit
# `rowid`, which becomes the column of that name.
TABLES = {
    "sessions": SESSION_COLUMNS,
    "events": f"{EVENT_COLUMNS}, extra",
    "runs": RUN_COLUMNS,
    "runners": "rowid, runner_id, registered_at, last_heartbeat, hostname, project_dir, executor_type, tags,"
               " status, deregistering",
    "runner_stops": "rowid, runner_id, run_id",
    "callbacks": "id, parent_session_id, child_session_id, failed, text",
    "callbacks_in_flight": "session_id",
    "changes": "id, type, session_id, payload",
    "approvals": APPROVAL_COLUMNS,
}

# Where each sequence goes on: past every id used, deleted rows included (SQLite's AUTOINCREMENT
# never hands out an id again; its `sqlite_sequence` remembers the highest).
SEQUENCES = {
    "changes_id_seq": "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0),"
                      " coalesce((SELECT max(id) FROM changes), 0), coalesce((SELECT max(id) FROM events), 0))",
    "callbacks_id_seq": "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'callbacks'), 0),"
                        " coalesce((SELECT max(id) FROM callbacks), 0))",
    "runners_rowid_seq": "SELECT coalesce(max(rowid), 0) FROM runners",
    "runner_stops_rowid_seq": "SELECT coalesce(max(rowid), 0) FROM runner_stops",
}


class Refused(Exception):
    """The copy was not started (the message says why)."""


def copy_database(source: Path, url: str) -> dict[str, int]:
    """Copy the SQLite database at `source` into the empty PostgreSQL database at `url`;
    returns the rows copied per table. Refused if there is no source or the target holds data."""
    if not source.is_file():
        raise Refused(f"there is no SQLite database at {source}")
    src = sqlite.connect(source)
    try:
        sqlite.migrate(src)
        src.execute("BEGIN")  # one snapshot for the whole copy
        with postgres.connect(url) as dst:
            postgres.migrate(dst)
            with dst.transaction():
                _require_empty(dst)
                dst.execute("SET CONSTRAINTS ALL DEFERRED")  # rows come in table order, not key order
                copied = {}
                for table, columns in TABLES.items():
                    with dst.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        copied[table] = 0
                        for row in src.execute(f"SELECT {columns} FROM {table}"):
                            copy.write_row(row)
                            copied[table] += 1
                dst.execute(
                    "UPDATE meta SET value = %s WHERE key = 'max_deleted_change'", (changes.max_deleted(src),)
                )
                for sequence, query in SEQUENCES.items():
                    if position := src.execute(query).fetchone()[0]:
                        dst.execute("SELECT setval(%s, %s)", (sequence, position))
        src.execute("COMMIT")
    finally:
        src.close()
    return copied


def _require_empty(dst) -> None:
    """A target that holds rows, or has handed out cursors, would mix two histories."""
    held = [table for table in TABLES if dst.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]]
    if dst.execute("SELECT is_called FROM changes_id_seq").fetchone()[0] and not held:
        held.append("change cursors handed out")
    if held:
        raise Refused(f"the target database is not empty ({', '.join(held)}): copy into an empty database")
