"""Claude Code hooks: each hook a Claude Code session posts becomes one event of a coordinator
session, in one transaction with what it changes (the session created, started or finished, an
approval requested when a rule says a person decides).

The session is the one a runner bound to this Claude Code session (`executor_session_id`), else
the one whose id is the hook's `session_id`, created `running` on first sight. The event has a
type existing dashboards know where there is one, and keeps the rest of the hook's payload as
its extra keys, verbatim.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import NamedTuple, Sequence

import msgspec

from store import approvals
from store.backend import Connection
from store.changes import record_session
from store.events import insert_event
from store.models import SESSION_COLUMNS, Approval, ApprovalRule, ClaudeCodeHook, Event, Session, extra_json
from store.sessions import get_session, update_session
from store.stamps import now_ts

# Hooks whose answer can allow or deny the tool call.
DECIDING_HOOKS = ("PreToolUse", "PermissionRequest")
_TOOL_RESULT_HOOKS = ("PostToolUse", "PostToolUseFailure")


class HookOutcome(NamedTuple):
    session_id: str
    event_id: int
    approval: Approval | None  # pending: the hook waits for a person


def rule_applies(rules: Sequence[ApprovalRule], tool_name: str, agent: str | None, project_dir: str | None) -> bool:
    """Some rule's globs match the tool, and its agent and project dir patterns where it has them
    (a call without an agent or project dir matches no rule that names one)."""
    def fits(pattern: str | None, value: str | None) -> bool:
        return pattern is None or (value is not None and fnmatchcase(value, pattern))

    return any(
        fnmatchcase(tool_name, rule.tool) and fits(rule.agent, agent) and fits(rule.project_dir, project_dir)
        for rule in rules
    )


def _session(conn: Connection, hook: ClaudeCodeHook) -> Session:
    """The session the hook belongs to, created (announced) on first sight."""
    row = conn.execute(
        f"SELECT {SESSION_COLUMNS} FROM sessions WHERE executor_session_id = ? ORDER BY created_at DESC LIMIT 1",
        (hook.session_id,),
    ).fetchone()
    if row is not None:
        return Session(*row)
    session = get_session(conn, hook.session_id)
    if session is None:
        session = Session(hook.session_id, "running", now_ts(), project_dir=hook.cwd)
        values = tuple(getattr(session, name) for name in Session.__struct_fields__)
        conn.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)
        record_session(conn, "session_created", session)
    return session


def _text(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text}]


def hook_event(hook: ClaudeCodeHook, fields: dict[str, msgspec.Raw], session_id: str) -> tuple[Event, str | None]:
    """The event a hook becomes, and its extra keys: every key of the payload but the known event
    keys (the event carries those) and a tool's `tool_response` (its `tool_output`)."""
    name = hook.hook_event_name
    event = Event(
        event_type=name,
        session_id=session_id,
        timestamp=now_ts(),
        tool_name=hook.tool_name,
        tool_input=fields.get("tool_input"),  # verbatim, like every JSON value of the hook
        error=hook.error,
        reason=hook.reason,
    )
    skip = ()
    if name == "PreToolUse":
        event.event_type = "pre_tool"
    elif name in _TOOL_RESULT_HOOKS:
        event.event_type, event.tool_output, skip = "post_tool", fields.get("tool_response"), ("tool_response",)
    elif name == "UserPromptSubmit" and hook.prompt is not None:
        event.event_type, event.role, event.content = "message", "user", _text(hook.prompt)
    elif name == "Stop" and hook.last_assistant_message is not None:
        event.event_type, event.role, event.content = "message", "assistant", _text(hook.last_assistant_message)
    elif name == "SessionStart":
        event.event_type = "session_start"
    elif name == "SessionEnd":
        event.event_type = "session_stop"
    return event, extra_json(fields, skip)


def record_hook(
    conn: Connection,
    hook: ClaudeCodeHook,
    fields: dict[str, msgspec.Raw],
    rules: Sequence[ApprovalRule],
    approval_timeout: float,
) -> HookOutcome:
    """Store the hook as an event of its session; `SessionStart` makes the session `running`,
    `SessionEnd` finishes it (each announced before the event). A tool call that a rule
    holds for a person gets a pending approval."""
    session = _session(conn, hook)
    status = {"SessionStart": "running", "SessionEnd": "finished"}.get(hook.hook_event_name)
    if status is not None and session.status != status:
        session = record_session(conn, "session_updated", update_session(conn, session.session_id, status=status))
    event, extra = hook_event(hook, fields, session.session_id)
    event_id = insert_event(conn, event, extra)
    approval = None
    agent = hook.agent_type or session.agent_name
    if (
        hook.hook_event_name in DECIDING_HOOKS
        and hook.tool_name is not None
        and rule_applies(rules, hook.tool_name, agent, hook.cwd or session.project_dir)
    ):
        tool_input = fields.get("tool_input")
        approval = approvals.create_approval(
            conn,
            session.session_id,
            hook.tool_name,
            None if tool_input is None else bytes(tool_input).decode(),
            approval_timeout,
            source=approvals.HOOK,
            hook_event_name=hook.hook_event_name,
            tool_use_id=hook.tool_use_id,
            agent_id=hook.agent_id,
            agent_type=hook.agent_type,
        )
    return HookOutcome(session.session_id, event_id, approval)
