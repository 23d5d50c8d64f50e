"""Approval verbs: tool calls held for a person's decision, and their audit trail.

An approval is `pending` until someone decides it (`decided`: `decision` allow or deny, with who
and when), its time runs out (`decided` with the configured default, `decided_by` "timeout"), or
nobody can be answered any more (`expired`: the held hook request is gone). Every change is
announced through the change log: `approval_requested`, then one `approval_decided`.
"""

from __future__ import annotations

import uuid

import msgspec

from store.backend import Connection
from store.changes import record
from store.errors import Conflict, NotFound
from store.models import APPROVAL_COLUMNS, Approval
from store.sessions import require_session
from store.stamps import now_ts

APPROVAL_NOT_FOUND = "Approval not found"
HOOK = "claude_code"  # held by a hook request, which a restart cannot keep
API = "api"


def new_approval_id() -> str:
    return "apr_" + uuid.uuid4().hex[:12]


def _approval(row: tuple) -> Approval:
    approval = Approval(*row)
    if approval.tool_input is not None:
        approval.tool_input = msgspec.Raw(approval.tool_input.encode())
    return approval


def get_approval(conn: Connection, approval_id: str) -> Approval | None:
    row = conn.execute(f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE approval_id = ?", (approval_id,)).fetchone()
    return _approval(row) if row else None


def require_approval(conn: Connection, approval_id: str) -> Approval:
    approval = get_approval(conn, approval_id)
    if approval is None:
        raise NotFound(APPROVAL_NOT_FOUND)
    return approval


def list_approvals(
    conn: Connection, status: str | None = None, session_id: str | None = None, limit: int | None = None
) -> list[Approval]:
    """Newest first; optionally of one status and one session, the first N."""
    where = " AND ".join(
        clause for clause, value in (("status = ?", status), ("session_id = ?", session_id)) if value is not None
    )
    params = tuple(value for value in (status, session_id) if value is not None)
    where = f"WHERE {where}" if where else ""
    sql = f"SELECT {APPROVAL_COLUMNS} FROM approvals {where} ORDER BY requested_at DESC, approval_id"
    if limit is not None:
        sql, params = sql + " LIMIT ?", (*params, limit)
    return [_approval(row) for row in conn.execute(sql, params)]


def create_approval(
    conn: Connection,
    session_id: str,
    tool_name: str,
    tool_input: str | None,
    timeout_seconds: float,
    *,
    source: str = API,
    hook_event_name: str | None = None,
    tool_use_id: str | None = None,
    agent_id: str | None = None,
    agent_type: str | None = None,
) -> Approval:
    """A pending approval of an existing session (`tool_input`: JSON text), announced as
    `approval_requested`; it times out `timeout_seconds` from now."""
    require_session(conn, session_id)
    approval = Approval(
        approval_id=new_approval_id(),
        session_id=session_id,
        source=source,
        hook_event_name=hook_event_name,
        tool_name=tool_name,
        tool_input=None if tool_input is None else msgspec.Raw(tool_input.encode()),
        tool_use_id=tool_use_id,
        agent_id=agent_id,
        agent_type=agent_type,
        requested_at=now_ts(),
        expires_at=now_ts(timeout_seconds),
        status="pending",
        decision=None,
        reason=None,
        decided_by=None,
        decided_at=None,
    )
    values = [getattr(approval, name) for name in Approval.__struct_fields__]
    values[Approval.__struct_fields__.index("tool_input")] = tool_input
    conn.execute(f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
    record(conn, "approval_requested", session_id, {"approval": approval})
    return approval


def _settle(conn: Connection, approval_id: str, status: str, decision: str | None, reason: str | None,
            decided_by: str | None) -> Approval | None:
    """End a pending approval (announced as `approval_decided`); None if it was not pending."""
    changed = conn.execute(
        "UPDATE approvals SET status = ?, decision = ?, reason = ?, decided_by = ?, decided_at = ?"
        f" WHERE approval_id = ? AND status = 'pending' RETURNING {APPROVAL_COLUMNS}",
        (status, decision, reason, decided_by, now_ts(), approval_id),
    ).fetchall()
    if not changed:
        return None
    approval = _approval(changed[0])
    record(conn, "approval_decided", approval.session_id, {"approval": approval})
    return approval


def decide(conn: Connection, approval_id: str, decision: str, reason: str | None, decided_by: str) -> Approval:
    """A person's decision. NotFound, or Conflict when it was decided (or expired) before."""
    approval = _settle(conn, approval_id, "decided", decision, reason, decided_by)
    if approval is None:
        current = require_approval(conn, approval_id)
        raise Conflict(f"Approval already {current.status}")
    return approval


def expire(conn: Connection, approval_id: str, reason: str) -> Approval:
    """Nobody can be answered any more: a pending approval becomes `expired`. Returns the
    approval as it now is (decided meanwhile, it stays decided)."""
    return _settle(conn, approval_id, "expired", None, reason, None) or require_approval(conn, approval_id)


def apply_timeouts(conn: Connection, decision: str, timeout_seconds: float) -> list[Approval]:
    """Every pending approval whose time ran out gets the default decision, by "timeout"."""
    overdue = [
        approval_id
        for (approval_id,) in conn.execute(
            "SELECT approval_id FROM approvals WHERE status = 'pending' AND expires_at <= ?", (now_ts(),)
        )
    ]
    reason = f"No decision within {timeout_seconds:g} s: {decision} by default"
    return [_settle(conn, approval_id, "decided", decision, reason, "timeout") for approval_id in overdue]


def next_expiry(conn: Connection) -> str | None:
    """When the next pending approval times out."""
    return conn.execute("SELECT min(expires_at) FROM approvals WHERE status = 'pending'").fetchone()[0]


def expire_held(conn: Connection, reason: str) -> int:
    """At start-up: the hook requests that held pending approvals are gone with the old process."""
    held = [
        approval_id
        for (approval_id,) in conn.execute(
            "SELECT approval_id FROM approvals WHERE status = 'pending' AND source = ?", (HOOK,)
        )
    ]
    for approval_id in held:
        _settle(conn, approval_id, "expired", None, reason, None)
    return len(held)
