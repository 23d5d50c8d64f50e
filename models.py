"""msgspec Structs: request bodies and the records the API returns.

Field order is wire order: msgspec encodes fields in declaration order, and clients see every
key (null when unset) unless a Struct says `omit_defaults`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

SessionStatus = Literal["pending", "running", "stopping", "stopped", "finished"]
ExecutionMode = Literal["sync", "async_poll", "async_callback"]


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
    exit_code: int | None = None
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
