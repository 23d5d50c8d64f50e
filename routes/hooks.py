"""`POST /hooks/claude-code`: what Claude Code's HTTP hooks post, for every hook event.

Each hook becomes an event of its session (store.hooks). The answer is Claude Code's "no
decision" (`{}`) at once, unless an approval rule holds the tool call for a person: then the
request is held until the approval is decided and answered with the decision in the format of
the hook (`PreToolUse` or `PermissionRequest`). Shapes as documented in Claude Code's hooks
reference; see README, "Claude Code".
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from store.models import Approval, ClaudeCodeHook
from routes.common import json_response, read_body
from routes.open_events import raw_fields
from store import hooks

_hook = msgspec.json.Decoder(ClaudeCodeHook)

NO_DECISION: dict[str, Any] = {}


class _HookDecoder:
    """The hook's fields the coordinator reads, and all of its keys with their values as sent."""

    def decode(self, body: bytes) -> tuple[ClaudeCodeHook, dict[str, msgspec.Raw]]:
        return _hook.decode(body), raw_fields(body)


_decoder = _HookDecoder()


def _reason(approval: Approval) -> str:
    if approval.reason:
        return approval.reason
    verb = "Allowed" if approval.decision == "allow" else "Denied"
    return f"{verb} by {approval.decided_by} through the agent coordinator"


def hook_answer(hook_event_name: str, approval: Approval) -> dict[str, Any]:
    """What Claude Code reads back: the decision in the hook's own format. An approval nobody
    decided (the coordinator shut down) hands the decision back to Claude Code: `ask` for
    `PreToolUse`, no decision (its own permission dialog) for `PermissionRequest`."""
    if hook_event_name == "PreToolUse":
        decision = approval.decision if approval.status == "decided" else "ask"
        return {"hookSpecificOutput": {
            "hookEventName": "PreToolUse", "permissionDecision": decision, "permissionDecisionReason": _reason(approval),
        }}
    if approval.status != "decided":
        return NO_DECISION
    behavior: dict[str, Any] = {"behavior": approval.decision}
    if approval.decision == "deny":
        behavior["message"] = _reason(approval)
    return {"hookSpecificOutput": {"hookEventName": "PermissionRequest", "decision": behavior}}


async def claude_code(request: Request):
    hook, fields = await read_body(request, _decoder)
    state = request.app.state
    settings = state.settings
    outcome = await state.db.write(hooks.record_hook, hook, fields, settings.approval_rules, settings.approval_timeout)
    if outcome.approval is None:
        return json_response(NO_DECISION)
    state.approvals.created()
    approval = await state.approvals.hold(outcome.approval.approval_id, request.receive)
    return json_response(hook_answer(hook.hook_event_name, approval))


routes = [Route("/hooks/claude-code", claude_code, methods=["POST"])]
