"""Callbacks: a child session started in `async_callback` mode reports back to its parent by a
resume run of the parent, once the parent is idle (`finished`).

A child's outcome is delivered at once when the parent is finished and no callback is in flight
for it; otherwise it is queued until the parent's next `session_stop`, which delivers everything
queued as one resume run. Queued outcomes and in-flight marks are rows, so they survive restarts
and vanish with the parent session.
"""

from __future__ import annotations

from typing import NamedTuple

import apsw

from store.errors import NotFound, Rejected
from store.models import Run, Session
from store.runs import insert_run, new_run
from store.sessions import get_session, session_result


class Outcome(NamedTuple):
    child_session_id: str
    failed: bool
    text: str | None  # the child's result, or its error


def prompt(outcomes: list[Outcome]) -> str:
    """The resume prompt that tells the parent's agent what its children did."""
    if len(outcomes) == 1:
        child, failed, text = outcomes[0]
        if failed:
            return (
                f'The child agent session "{child}" has failed.\n\n## Error\n\n{text or "Unknown error"}'
                "\n\nPlease handle this failure and continue with the orchestration."
            )
        return (
            f'The child agent session "{child}" has completed.\n\n## Child Result\n\n'
            f"{text or '(No result available)'}\n\nPlease continue with the orchestration based on this result."
        )
    parts = "\n\n---\n\n".join(
        f"### Child: {child} ({'FAILED' if failed else 'completed'})\n\n"
        f"{text or ('Unknown error' if failed else '(No result available)')}"
        for child, failed, text in outcomes
    )
    return (
        f"Multiple child agent sessions have completed.\n\n{parts}"
        "\n\nPlease continue with the orchestration based on these results."
    )


def _resume(conn: apsw.Connection, parent: Session, outcomes: list[Outcome]) -> Run:
    """Mark the parent in flight and queue its resume run (no demands, never announced)."""
    conn.execute("INSERT OR IGNORE INTO callbacks_in_flight (session_id) VALUES (?)", (parent.session_id,))
    run = new_run(
        parent.session_id,
        "resume_session",
        prompt(outcomes),
        agent_name=parent.agent_name,
        project_dir=parent.project_dir,
    )
    return insert_run(conn, run)


def child_completed(conn: apsw.Connection, parent_id: str, outcome: Outcome) -> Run | None:
    """Deliver a child's outcome to its parent now, or queue it; returns a created run."""
    parent = get_session(conn, parent_id)
    if parent is None or parent_id == outcome.child_session_id:
        return None
    in_flight = conn.execute("SELECT 1 FROM callbacks_in_flight WHERE session_id = ?", (parent_id,)).fetchone()
    if not in_flight and parent.status == "finished":
        return _resume(conn, parent, [outcome])
    conn.execute(
        "INSERT INTO callbacks (parent_session_id, child_session_id, failed, text) VALUES (?, ?, ?, ?)",
        (parent_id, *outcome),
    )
    return None


def on_session_stop(conn: apsw.Connection, session_id: str) -> list[Run]:
    """After a `session_stop` of S: an `async_callback` child reports its result to its parent,
    then S's in-flight mark is cleared and whatever was queued for S goes out as one run."""
    session = get_session(conn, session_id)
    if session is None:
        return []
    created = []
    if session.parent_session_id and session.execution_mode == "async_callback":
        try:
            result = session_result(conn, session_id)
        except (NotFound, Rejected):
            result = None
        if run := child_completed(conn, session.parent_session_id, Outcome(session_id, False, result)):
            created.append(run)
    conn.execute("DELETE FROM callbacks_in_flight WHERE session_id = ?", (session_id,))
    queued = conn.execute(
        "DELETE FROM callbacks WHERE parent_session_id = ? RETURNING id, child_session_id, failed, text",
        (session_id,),
    ).fetchall()
    if queued:
        outcomes = [Outcome(child, bool(failed), text) for _, child, failed, text in sorted(queued)]
        created.append(_resume(conn, session, outcomes))
    return created
