"""Agent blueprints: one directory per agent under the agents dir, the files being the truth.

Layout of `{agents_dir}/{name}/`: `agent.json` (required: name, description, skills?, tags?,
demands?), `agent.system-prompt.md` (raw text), `agent.mcp.json` (`{"mcpServers": {...}}`) and
`.disabled` (present = inactive). Nothing is cached: every call reads the disk, so hand edits
show on the next request. The verbs do blocking file I/O: call them from a worker thread.

The agents dir is the boundary: a blueprint whose directory or files resolve (through symbolic
links) outside it is neither served nor changed; links that stay inside are followed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from store.errors import Conflict, Forbidden, NotFound, Rejected

log = logging.getLogger("coordinator.agents")

AGENT_FILE = "agent.json"
PROMPT_FILE = "agent.system-prompt.md"
MCP_FILE = "agent.mcp.json"
DISABLED_FILE = ".disabled"
BLUEPRINT_FILES = (AGENT_FILE, PROMPT_FILE, MCP_FILE, DISABLED_FILE)

MAX_NAME = 60
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_-]*")

# Read-modify-write of a blueprint must not interleave with another one.
_lock = threading.Lock()

T = TypeVar("T")
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Status = Literal["active", "inactive"]


class McpStdio(msgspec.Struct, tag_field="type", tag="stdio", forbid_unknown_fields=True, omit_defaults=True):
    command: str
    args: list[str]
    env: dict[str, str] | None = None


class McpHttp(msgspec.Struct, tag_field="type", tag="http", forbid_unknown_fields=True, omit_defaults=True):
    url: str
    headers: dict[str, str] | None = None


# Tagged: `type` is always written, which the runner needs to resolve placeholders.
McpServer = McpStdio | McpHttp


class Demands(msgspec.Struct, omit_defaults=True):
    hostname: str | None = None
    project_dir: str | None = None
    executor_type: str | None = None
    # omit_defaults drops an empty list made by a `list` factory, never one made by a lambda:
    # `tags` is always written, `[]` included.
    tags: list[str] = msgspec.field(default_factory=lambda: [])

    def is_empty(self) -> bool:
        return self.hostname is None and self.project_dir is None and self.executor_type is None and not self.tags


class Agent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A blueprint as served: unset optional keys are left out, `tags` and `status` never are."""

    name: str
    description: str
    system_prompt: str | None = None
    mcp_servers: dict[str, McpServer] | None = None
    skills: list[str] | None = None
    tags: list[str]
    demands: Demands | None = None
    status: Status
    created_at: str
    modified_at: str


class CreateAgent(msgspec.Struct):
    name: str  # checked by `name_problem` (400), not by the decoder (422)
    description: NonEmpty
    system_prompt: str | None = None
    mcp_servers: dict[str, McpServer] | None = None
    skills: list[str] | None = None
    tags: list[str] | None = None
    demands: Demands | None = None


class UpdateAgent(msgspec.Struct):
    """PATCH: null or absent leaves a field unchanged, except `demands`, where null clears."""

    description: NonEmpty | None = None
    system_prompt: str | None = None
    mcp_servers: dict[str, McpServer] | None = None
    skills: list[str] | None = None
    tags: list[str] | None = None
    demands: Demands | None | UnsetType = UNSET


class StatusUpdate(msgspec.Struct):
    status: Status


class _AgentFile(msgspec.Struct):
    name: NonEmpty
    description: NonEmpty
    skills: list[str] | None = None
    tags: list[str] | None = None
    demands: Any = None  # read only when it is a non-empty object


class _McpFile(msgspec.Struct):
    mcpServers: Any = None


_agent_file = msgspec.json.Decoder(_AgentFile)
_mcp_file = msgspec.json.Decoder(_McpFile)


def default_stdio(servers: Any) -> Any:
    """MCP entries without a `type` are stdio, whether sent by a client or read from disk."""
    if not isinstance(servers, dict):
        return servers
    return {key: {"type": "stdio", **entry} if isinstance(entry, dict) else entry for key, entry in servers.items()}


def from_body(body: dict[str, Any], type_: type[T]) -> T:
    """A decoded create or update body as `type_`; raises msgspec.ValidationError."""
    if "mcp_servers" in body:
        body = {**body, "mcp_servers": default_stdio(body["mcp_servers"])}
    return msgspec.convert(body, type_)


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an agent, or None when it can."""
    if not name:
        return "Agent name is required"
    if len(name) > MAX_NAME:
        return f"Agent name must be {MAX_NAME} characters or less"
    if not _NAME.fullmatch(name):
        return "Agent name must start with letter/number and contain only alphanumeric characters, hyphens, and underscores"
    return None


def _dir_of(agents_dir: Path, name: str) -> Path | None:
    # A valid name has no `.`, `/`, `\` or NUL, so it can only ever name a child of agents_dir.
    return None if name_problem(name) else agents_dir / name


def _not_found(name: str) -> NotFound:
    return NotFound(f"Agent not found: {name}")


def _outside(agents_dir: Path, agent_dir: Path) -> str | None:
    """Which of the blueprint's directory and files resolves outside the agents dir, and to
    what; None when all stay inside (links among blueprints are fine)."""
    root = Path(os.path.realpath(agents_dir))
    for path in (agent_dir, *(agent_dir / filename for filename in BLUEPRINT_FILES)):
        real = Path(os.path.realpath(path))
        if root not in real.parents:
            return f"{path} resolves to {real}"
    return None


# -- reading ------------------------------------------------------------------------------


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).isoformat(timespec="microseconds")


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _load(agent_dir: Path) -> Agent:
    """Read one blueprint; OSError or ValueError when it is incomplete or malformed."""
    with open(agent_dir / AGENT_FILE, "rb") as f:
        data = _agent_file.decode(f.read())
        stat = os.fstat(f.fileno())
    prompt = _read_optional(agent_dir / PROMPT_FILE)
    mcp = _read_optional(agent_dir / MCP_FILE)
    servers = _mcp_file.decode(mcp).mcpServers if mcp is not None else None
    return Agent(
        name=data.name,
        description=data.description,
        system_prompt=prompt.decode() if prompt is not None else None,
        mcp_servers=msgspec.convert(default_stdio(servers), dict[str, McpServer]) if servers else None,
        skills=data.skills,
        tags=data.tags or [],
        demands=msgspec.convert(data.demands, Demands) if data.demands else None,
        status="inactive" if (agent_dir / DISABLED_FILE).exists() else "active",
        created_at=_stamp(stat.st_ctime),
        modified_at=_stamp(stat.st_mtime),
    )


def _read(agents_dir: Path, agent_dir: Path) -> Agent | None:
    outside = _outside(agents_dir, agent_dir)
    if outside is not None:
        log.warning("Skipping agent directory %s: it links outside the agents dir (%s)", agent_dir, outside)
        return None
    try:
        return _load(agent_dir)
    except (OSError, ValueError) as exc:
        log.warning("Skipping agent directory %s: %s", agent_dir, exc)
        return None


def read_agent(agents_dir: Path, name: str) -> Agent | None:
    """`read_agent(agents_dir: Path, name: str) -> Agent | None`

    The blueprint in `agents_dir/name`, or None when `name` could never be valid (checked before
    any file is touched), the directory is missing, links outside `agents_dir`, or its files are
    incomplete or malformed. Blocking: call it from a worker thread.
    """
    agent_dir = _dir_of(agents_dir, name)
    if agent_dir is None or not agent_dir.is_dir():
        return None
    return _read(agents_dir, agent_dir)


def require_agent(agents_dir: Path, name: str) -> Agent:
    """`read_agent`, or Forbidden for a blueprint that links outside, NotFound for any other None."""
    agent = read_agent(agents_dir, name)
    if agent is None:
        agent_dir = _dir_of(agents_dir, name)
        if agent_dir is not None and agent_dir.is_dir() and _outside(agents_dir, agent_dir):
            raise Forbidden(f"Agent {name} links outside the agents directory")
        raise _not_found(name)
    return agent


def list_agents(agents_dir: Path, tags: Sequence[str] = ()) -> list[Agent]:
    """Every readable blueprint, inactive ones included, by name; with `tags`, those having all.

    Unreadable directories are skipped with a warning; hidden ones (where writes are staged) and
    plain files are ignored. A missing agents dir means no agents.
    """
    try:
        entries = [Path(e.path) for e in os.scandir(agents_dir) if e.is_dir() and not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    wanted = set(tags)
    read = (_read(agents_dir, entry) for entry in entries)
    found = [agent for agent in read if agent is not None and wanted <= set(agent.tags)]
    return sorted(found, key=lambda agent: agent.name)


# -- writing ------------------------------------------------------------------------------


@contextlib.contextmanager
def _writing(agents_dir: Path) -> Iterator[None]:
    """Writes one at a time: among this process's threads (the lock), and among every process
    sharing the agents dir, as several coordinators on one volume do (`flock` on the directory
    itself, released by the kernel if the holder dies)."""
    with _lock:
        agents_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(agents_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # and with it the lock


def _temp_path(path: Path) -> Path:
    # Hidden and next to `path`, so that the final rename stays within one directory.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


_TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")  # what `_temp_path` makes of a name


def _temp_of(filename: str) -> str | None:
    """The name `filename` was made from by `_temp_path`, or None when it is no such name."""
    match = _TEMP_NAME.fullmatch(filename)
    return match.group(1) if match else None


def remove_leftovers(agents_dir: Path) -> None:
    """Remove what writes cut short by a crash left behind, all named by `_temp_path`: staging
    and trash directories (or a trashed link) in the agents dir, temp files in the blueprint
    directories. Nothing else is touched, and no link is followed. Call it at start-up: it
    waits for writes under way (another coordinator's on a shared agents dir) to finish."""
    if not agents_dir.is_dir():
        return  # no agents dir, no leftovers
    try:
        with _writing(agents_dir):
            _remove_leftovers(agents_dir)
    except OSError as exc:  # the agents routes will fail on it as well; serving need not wait
        log.warning("Could not clean the agents dir %s: %s", agents_dir, exc)


def _remove_leftovers(agents_dir: Path) -> None:
    try:
        entries = list(os.scandir(agents_dir))
        leftovers = [e for e in entries if (name := _temp_of(e.name)) and name_problem(name) is None]
        for blueprint in entries:
            if blueprint.is_dir(follow_symlinks=False) and not blueprint.name.startswith("."):
                leftovers += [f for f in os.scandir(blueprint.path) if _temp_of(f.name) in BLUEPRINT_FILES]
        for leftover in leftovers:
            log.info("Removing %s, left by an interrupted agent write", leftover.path)
            if leftover.is_dir(follow_symlinks=False):
                shutil.rmtree(leftover.path)
            else:
                os.unlink(leftover.path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # gone meanwhile


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, content: bytes) -> None:
    """Replace `path` whole or not at all: write and fsync a temp file, then rename it over."""
    temp = _temp_path(path)
    # os.open rather than mkstemp: the file gets the usual umask-based mode, not 0600.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_bytes(data: Any) -> bytes:
    # The reference's format: json.dump with indent=2 (ASCII escapes) plus a newline.
    return (json.dumps(msgspec.to_builtins(data), indent=2) + "\n").encode()


def _write_or_remove(path: Path, content: bytes) -> None:
    """Write `content` atomically, or remove the file when it is empty."""
    if content:
        _write_atomic(path, content)
    else:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)


def _stage(staging: Path, body: CreateAgent) -> None:
    data: dict[str, Any] = {"name": body.name, "description": body.description}
    if body.skills:
        data["skills"] = body.skills
    if body.tags:
        data["tags"] = body.tags
    if body.demands is not None:
        data["demands"] = body.demands
    _write_atomic(staging / AGENT_FILE, _json_bytes(data))
    if body.system_prompt:
        _write_atomic(staging / PROMPT_FILE, body.system_prompt.encode())
    if body.mcp_servers:
        _write_atomic(staging / MCP_FILE, _json_bytes({"mcpServers": body.mcp_servers}))


def create_agent(agents_dir: Path, body: CreateAgent) -> Agent:
    """Rejected for a bad name, Conflict if the directory exists; the agents dir is made if missing.

    The files are written into a hidden directory that is then renamed into place, so the
    blueprint appears whole or not at all.
    """
    problem = name_problem(body.name)
    if problem:
        raise Rejected(problem)
    target = agents_dir / body.name
    exists = Conflict(f"Agent already exists: {body.name}")
    with _writing(agents_dir):
        if os.path.lexists(target):
            raise exists
        staging = _temp_path(target)
        staging.mkdir()
        try:
            _stage(staging, body)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.lexists(target):  # made by hand since the check above
                raise exists from None
            raise
        _fsync_dir(agents_dir)
        return require_agent(agents_dir, body.name)


def update_agent(agents_dir: Path, name: str, body: UpdateAgent) -> Agent:
    """Apply a PATCH (see README, "Agents API") to a readable blueprint; unknown keys in agent.json are kept."""
    with _writing(agents_dir):
        require_agent(agents_dir, name)
        agent_dir = agents_dir / name
        data = msgspec.json.decode((agent_dir / AGENT_FILE).read_bytes())
        if body.description is not None:
            data["description"] = body.description
        for key, value in (("skills", body.skills), ("tags", body.tags)):
            if value:
                data[key] = value
            elif value is not None:
                data.pop(key, None)
        if body.demands is not UNSET:
            if body.demands is None or body.demands.is_empty():
                data.pop("demands", None)
            else:
                data["demands"] = body.demands
        # Everything is encoded before the first write, so a bad value changes nothing.
        writes = {AGENT_FILE: _json_bytes(data)}
        if body.system_prompt is not None:
            writes[PROMPT_FILE] = body.system_prompt.encode()
        if body.mcp_servers is not None:
            writes[MCP_FILE] = _json_bytes({"mcpServers": body.mcp_servers}) if body.mcp_servers else b""
        for filename, content in writes.items():
            _write_or_remove(agent_dir / filename, content)
        return require_agent(agents_dir, name)


def delete_agent(agents_dir: Path, name: str) -> None:
    """Remove the directory `name`, readable blueprint or not; NotFound if there is none.

    It is renamed to a hidden name first, so a crash mid-removal never leaves half an agent.
    """
    agent_dir = _dir_of(agents_dir, name)
    with _writing(agents_dir):
        if agent_dir is None or not agent_dir.is_dir():
            raise _not_found(name)
        trash = _temp_path(agent_dir)
        os.rename(agent_dir, trash)
        _fsync_dir(agents_dir)
        if trash.is_symlink():  # remove a linked blueprint's link, never what it points to
            trash.unlink()
        else:
            shutil.rmtree(trash)


def set_status(agents_dir: Path, name: str, status: Status) -> Agent:
    """`inactive` creates the `.disabled` marker, `active` removes it."""
    with _writing(agents_dir):
        require_agent(agents_dir, name)
        marker = agents_dir / name / DISABLED_FILE
        if status == "inactive":
            marker.touch()
        else:
            marker.unlink(missing_ok=True)
        _fsync_dir(marker.parent)
        return require_agent(agents_dir, name)
