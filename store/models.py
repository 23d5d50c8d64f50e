"""msgspec Structs: request bodies and the records the API returns.

Field order is wire order: msgspec encodes fields in declaration order, and clients see every
key (null when unset) unless a Struct says `omit_defaults`.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterable, Literal

import msgspec

SessionStatus = Literal["pending", "running", "stopping", "stopped", "finished"]
ExecutionMode = Literal["sync", "async_poll", "async_callback"]
# An integer SQLite can store: a larger one is refused by validation (422), not by the write.
SqlInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class Session(msgspec.Struct):
    session_id: str
    status: str
    created_at: str
    project_dir: str | None = None
    agent_name: str | None = None
    last_resumed_at: str | None = None
    parent_session_id: str | None = None
    execution_mode: str | None = "sync"
    executor_session_id: str | None = None
    executor_type: str | None = None
    hostname: str | None = None


SESSION_COLUMNS = ", ".join(Session.__struct_fields__)


class Event(msgspec.Struct):
    """An event as clients send it, and as it is broadcast (no `id`)."""

    event_type: str
    session_id: str
    timestamp: str
    tool_name: str | None = None
    tool_input: dict[str, Any] | None = None
    tool_output: Any = None
    error: str | None = None
    exit_code: SqlInt | None = None
    reason: str | None = None
    role: str | None = None
    content: list[dict[str, Any]] | None = None


class EventRow(msgspec.Struct):
    """A stored event. The JSON columns stay the stored text and are spliced in verbatim."""

    id: int
    session_id: str
    event_type: str
    timestamp: str
    tool_name: str | None
    tool_input: msgspec.Raw | None
    tool_output: msgspec.Raw | None
    error: str | None
    exit_code: int | None
    reason: str | None
    role: str | None
    content: msgspec.Raw | None


EVENT_COLUMNS = ", ".join(EventRow.__struct_fields__)
# The keys an event has of its own; a client's other keys are its extra keys (`id` included:
# it is the stored event's own key in the answers).
EVENT_KEYS = frozenset(EventRow.__struct_fields__)


def extra_json(fields: dict[str, msgspec.Raw], skip: Iterable[str] = ()) -> str | None:
    """The keys of `fields` (a JSON object's keys with their values undecoded) beyond the event's
    own (and `skip`) as one JSON object, in the order sent, values byte for byte; None when there
    are none. A value that is not UTF-8 raises UnicodeDecodeError."""
    if fields.keys() <= EVENT_KEYS:
        return None
    extra = {key: value for key, value in fields.items() if key not in EVENT_KEYS and key not in skip}
    return msgspec.json.encode(extra).decode() if extra else None


class StoredEvent(msgspec.Struct):
    """A stored event as broadcast (the `Event` keys, no `id`), JSON columns spliced verbatim."""

    event_type: str
    session_id: str
    timestamp: str
    tool_name: str | None
    tool_input: msgspec.Raw | None
    tool_output: msgspec.Raw | None
    error: str | None
    exit_code: int | None
    reason: str | None
    role: str | None
    content: msgspec.Raw | None


class CreateSession(msgspec.Struct):
    session_id: str
    project_dir: str | None = None
    agent_name: str | None = None
    parent_session_id: str | None = None
    execution_mode: ExecutionMode | None = None


class BindSession(msgspec.Struct):
    executor_session_id: str
    hostname: str
    executor_type: str
    project_dir: str | None = None


class SessionMetadata(msgspec.Struct):
    """PATCH /sessions/{id}/metadata: null or absent leaves a field unchanged."""

    project_dir: str | None = None
    agent_name: str | None = None
    last_resumed_at: str | None = None
    executor_session_id: str | None = None
    executor_type: str | None = None
    hostname: str | None = None


RunType = Literal["start_session", "resume_session"]


class Demands(msgspec.Struct):
    """What a run asks of its runner (`additional_demands` of POST /runs)."""

    hostname: str | None = None
    project_dir: str | None = None
    executor_type: str | None = None
    tags: list[str] | None = None


class CreateRun(msgspec.Struct):
    type: RunType
    prompt: str
    session_id: str | None = None
    agent_name: str | None = None
    project_dir: str | None = None
    parent_session_id: str | None = None
    execution_mode: ExecutionMode | None = None
    additional_demands: Demands | None = None


class Run(msgspec.Struct):
    run_id: str
    type: str
    session_id: str
    agent_name: str | None
    prompt: str
    project_dir: str | None
    parent_session_id: str | None
    execution_mode: str
    demands: dict[str, Any] | None
    status: str
    runner_id: str | None
    error: str | None
    created_at: str
    claimed_at: str | None
    started_at: str | None
    completed_at: str | None
    timeout_at: str | None


RUN_COLUMNS = ", ".join(Run.__struct_fields__)


class Runner(msgspec.Struct):
    runner_id: str
    registered_at: str
    last_heartbeat: str
    hostname: str
    project_dir: str
    executor_type: str
    tags: list[str]
    status: str
    seconds_since_heartbeat: float


class RegisterRunner(msgspec.Struct):
    hostname: str
    project_dir: str
    executor_type: str
    tags: list[str] | None = None


class RunnerReport(msgspec.Struct):
    """Body of the runner's report and heartbeat calls; their other keys are ignored."""

    runner_id: str


class RunFailed(RunnerReport):
    error: str


# -- Claude Code hooks and approvals --------------------------------------------------------


class ClaudeCodeHook(msgspec.Struct):
    """What a Claude Code HTTP hook posts: the fields the coordinator reads. Every other key, of
    any hook event, is kept verbatim with the event (`extra`)."""

    session_id: str
    hook_event_name: str
    cwd: str | None = None
    transcript_path: str | None = None
    permission_mode: str | None = None
    tool_name: str | None = None
    tool_input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    prompt: str | None = None
    last_assistant_message: str | None = None
    error: str | None = None
    reason: str | None = None
    agent_id: str | None = None
    agent_type: str | None = None


ApprovalDecision = Literal["allow", "deny"]


class Approval(msgspec.Struct):
    """A tool call waiting for, or decided by, a person. `status`: pending, decided, expired
    (nobody can be answered any more); `decided_by` is who decided, or `timeout`."""

    approval_id: str
    session_id: str
    source: str  # "claude_code" (a held hook request) or "api"
    hook_event_name: str | None
    tool_name: str
    tool_input: msgspec.Raw | None
    tool_use_id: str | None
    agent_id: str | None
    agent_type: str | None
    requested_at: str
    expires_at: str
    status: str
    decision: str | None
    reason: str | None
    decided_by: str | None
    decided_at: str | None


APPROVAL_COLUMNS = ", ".join(Approval.__struct_fields__)


class RequestApproval(msgspec.Struct):
    """POST /approvals: any client asks a person whether a tool call may run."""

    session_id: str
    tool_name: str
    tool_input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    agent_id: str | None = None
    agent_type: str | None = None


class Decide(msgspec.Struct):
    decision: ApprovalDecision
    reason: str | None = None


class ApprovalRule(msgspec.Struct, forbid_unknown_fields=True):
    """Which hook tool calls wait for a person: glob patterns (fnmatch) on the tool name and,
    when given, on the agent and the project dir."""

    tool: str
    agent: str | None = None
    project_dir: str | None = None
