"""Counts for monitoring, read in one snapshot when metrics are scraped."""

from __future__ import annotations

from store.backend import Connection


def status_counts(conn: Connection) -> dict[str, dict[str, int]]:
    """How many runs and runners there are in each status."""
    return {
        table: dict(conn.execute(f"SELECT status, count(*) FROM {table} GROUP BY status").fetchall())
        for table in ("runs", "runners")
    }
