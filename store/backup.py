"""Online backup: a consistent copy of the database, taken while the server keeps writing."""

from __future__ import annotations

import os
from pathlib import Path

import apsw

from store.sqlite import BUSY_TIMEOUT_MS

PAGES_PER_STEP = 1024


def backup(source: Path, target: Path, pages_per_step: int = PAGES_PER_STEP) -> int:
    """Copy the database at `source` to `target` with SQLite's online backup API, a few pages
    per step; returns the number of pages copied.

    A read transaction held on the source for the whole copy pins one snapshot, so every step
    copies the same state and the copy never restarts, however busy the server is (in WAL mode
    a reader blocks no writer). The copy is written beside `target` and renamed over it only
    once complete, so `target` is never a half-written file."""
    if not source.is_file():
        raise FileNotFoundError(f"no database at {source}")
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    src = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READWRITE)  # never create one
    try:
        src.set_busy_timeout(BUSY_TIMEOUT_MS)
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_schema")  # starts the read: the snapshot
        dest = apsw.Connection(str(partial))
        try:
            with dest.backup("main", src, "main") as copy:
                while not copy.done:
                    copy.step(pages_per_step)
                pages = copy.page_count
        finally:
            dest.close()
    finally:
        src.close()  # ends the read transaction
    os.replace(partial, target)
    return pages
