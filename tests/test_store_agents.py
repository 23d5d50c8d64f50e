"""store/agents.py on a real temp directory."""

import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import msgspec
import pytest

from store import agents
from store.agents import UNSET, CreateAgent, Demands, McpHttp, McpStdio, UpdateAgent
from store.errors import Conflict, NotFound, Rejected

ROOT = Path(__file__).resolve().parent.parent


def dump(data) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_agent(agent_dir: Path, data, **files: bytes) -> Path:
    agent_dir.mkdir(parents=True)
    (agent_dir / "agent.json").write_bytes(data if isinstance(data, bytes) else dump(data))
    for filename, content in files.items():
        (agent_dir / filename).write_bytes(content)
    return agent_dir


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.fixture
def agents_dir(tmp_path) -> Path:
    return tmp_path / "agents"


def test_name_rules():
    for name in ["a", "A9", "9a", "a-b_c", "x" * 60]:
        assert agents.name_problem(name) is None
    assert agents.name_problem("") == "Agent name is required"
    assert agents.name_problem("x" * 61) == "Agent name must be 60 characters or less"
    for name in ["-a", "_a", "a.b", "..", "a/b", "a\\b", "/abs", "a\x00", "a\n", "\u0661", "caf\u00e9", " a"]:
        assert "must start with letter/number" in agents.name_problem(name), name


def test_invalid_names_never_reach_the_filesystem(agents_dir, tmp_path):
    write_agent(agents_dir / "real", {"name": "real", "description": "d"})
    victim = write_agent(tmp_path / "victim", {"name": "victim", "description": "d"})
    before = tree(tmp_path)
    for name in ["..", "../victim", str(victim), "real/../../victim", "victim\x00", "x" * 10_000, ".", ""]:
        assert agents.read_agent(agents_dir, name) is None
        with pytest.raises(NotFound, match="Agent not found"):
            agents.update_agent(agents_dir, name, UpdateAgent(description="pwned"))
        with pytest.raises(NotFound):
            agents.set_status(agents_dir, name, "inactive")
        with pytest.raises(NotFound):
            agents.delete_agent(agents_dir, name)
        with pytest.raises(Rejected):
            agents.create_agent(agents_dir, CreateAgent(name=name, description="pwned"))
    assert tree(tmp_path) == before


def test_create_read_round_trip(agents_dir):
    body = CreateAgent(
        name="full",
        description="d",
        system_prompt="p",
        mcp_servers={"s": McpStdio(command="c", args=["1"]), "h": McpHttp(url="u", headers={"A": "b"})},
        skills=["k"],
        tags=["t"],
        demands=Demands(hostname="h"),
    )
    created = agents.create_agent(agents_dir, body)
    assert agents.read_agent(agents_dir, "full") == created
    assert (created.system_prompt, created.mcp_servers, created.demands) == ("p", body.mcp_servers, body.demands)
    assert (created.skills, created.tags, created.status) == (["k"], ["t"], "active")
    assert sorted(p.name for p in agents_dir.iterdir()) == ["full"]  # the staging directory is gone
    with pytest.raises(Conflict, match="Agent already exists: full"):
        agents.create_agent(agents_dir, CreateAgent(name="full", description="again"))


def test_encoding_omits_unset_keys_but_never_tags():
    assert msgspec.json.encode(Demands()) == b'{"tags":[]}'
    assert msgspec.json.encode(Demands(hostname="h", tags=["a"])) == b'{"hostname":"h","tags":["a"]}'
    assert msgspec.json.encode(McpStdio(command="c", args=[])) == b'{"type":"stdio","command":"c","args":[]}'
    assert msgspec.json.encode(McpHttp(url="u")) == b'{"type":"http","url":"u"}'
    agent = agents.Agent(name="n", description="d", tags=[], status="active", created_at="c", modified_at="m",
                         demands=Demands(project_dir="/p"), skills=[])
    assert msgspec.json.encode(agent) == (
        b'{"name":"n","description":"d","skills":[],"tags":[],"demands":{"project_dir":"/p","tags":[]},'
        b'"status":"active","created_at":"c","modified_at":"m"}'
    )


def test_from_body():
    body = agents.from_body(
        {"name": "n", "description": "d", "mcp_servers": {"s": {"command": "c", "args": []},
                                                          "h": {"type": "http", "url": "u"}}},
        CreateAgent,
    )
    assert body.mcp_servers == {"s": McpStdio(command="c", args=[]), "h": McpHttp(url="u")}
    assert agents.from_body({}, UpdateAgent).demands is UNSET
    assert agents.from_body({"demands": None}, UpdateAgent).demands is None
    assert agents.from_body({"demands": {}}, UpdateAgent).demands == Demands()
    for bad in [{"description": ""}, {"mcp_servers": {"s": {"type": "stdio", "url": "u"}}}, {"tags": [1]}]:
        with pytest.raises(msgspec.ValidationError):
            agents.from_body(bad, UpdateAgent)


def test_update_rules(agents_dir):
    agent_dir = write_agent(agents_dir / "a", {"name": "a", "description": "d", "x": 1, "tags": ["t"],
                                               "demands": {"hostname": "h"}}, **{"agent.system-prompt.md": b"p"})
    agent = agents.update_agent(agents_dir, "a", UpdateAgent(skills=["s"], demands=Demands(tags=["g"])))
    assert (agent.skills, agent.tags, agent.demands, agent.system_prompt) == (["s"], ["t"], Demands(tags=["g"]), "p")
    agents.update_agent(agents_dir, "a", UpdateAgent(tags=[], demands=None, system_prompt=""))
    assert (agent_dir / "agent.json").read_bytes() == dump({"name": "a", "description": "d", "x": 1, "skills": ["s"]})
    assert sorted(p.name for p in agent_dir.iterdir()) == ["agent.json"]


def test_failed_create_leaves_nothing(agents_dir):
    # A lone surrogate cannot be encoded: the failure comes after agent.json was staged.
    with pytest.raises(UnicodeEncodeError):
        agents.create_agent(agents_dir, CreateAgent(name="half", description="d", system_prompt="\ud800"))
    assert list(agents_dir.iterdir()) == []
    assert agents.create_agent(agents_dir, CreateAgent(name="half", description="d")).name == "half"


def test_failed_update_changes_nothing(agents_dir):
    agent_dir = write_agent(agents_dir / "a", {"name": "a", "description": "d"}, **{"agent.system-prompt.md": b"p"})
    before = tree(agent_dir)
    with pytest.raises(UnicodeEncodeError):
        agents.update_agent(agents_dir, "a", UpdateAgent(description="new", system_prompt="\ud800"))
    assert tree(agent_dir) == before


KILLED_WRITER = """
import sys
from pathlib import Path
from store import agents
i = 0
while True:
    body = agents.UpdateAgent(description=f"{i}:" + "x" * 200_000, tags=[str(i)])
    agents.update_agent(Path(sys.argv[1]), "victim", body)
    print(i, flush=True)
    i += 1
"""


def test_killed_writer_never_leaves_half_a_file(agents_dir):
    # SIGKILL lands wherever the writer happens to be; the blueprint must always read back whole.
    write_agent(agents_dir / "victim", {"name": "victim", "description": "d"})
    for writes_before_kill in range(1, 6):
        with subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(agents_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) as writer:
            for _ in range(writes_before_kill):
                assert writer.stdout.readline()
            writer.kill()
        agent = agents.read_agent(agents_dir, "victim")
        assert agent is not None
        assert agent.description.startswith(f"{agent.tags[0]}:") and len(agent.description) > 200_000
        assert [a.name for a in agents.list_agents(agents_dir)] == ["victim"]


def test_list(agents_dir):
    assert agents.list_agents(agents_dir) == []
    for name, tags in [("b", ["x", "y"]), ("c", None), ("a", ["x"])]:
        agents.create_agent(agents_dir, CreateAgent(name=name, description="d", tags=tags))
    assert [a.name for a in agents.list_agents(agents_dir)] == ["a", "b", "c"]
    assert [a.name for a in agents.list_agents(agents_dir, ["x"])] == ["a", "b"]
    assert [a.name for a in agents.list_agents(agents_dir, ["x", "y"])] == ["b"]
    assert agents.list_agents(agents_dir, ["X"]) == []


def test_list_ignores_leftovers_and_files(agents_dir):
    write_agent(agents_dir / "real", {"name": "real", "description": "d"})
    (agents_dir / "real" / ".agent.json.0123abcd.tmp").write_bytes(b'{"name": "re')  # an interrupted write
    write_agent(agents_dir / ".real.0123abcd.tmp", {"name": "staged", "description": "d"})  # an interrupted create
    (agents_dir / "notes.txt").write_text("hi")
    assert [a.name for a in agents.list_agents(agents_dir)] == ["real"]


def test_agents_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert agents.list_agents(tmp_path / "file") == []
    assert agents.read_agent(tmp_path / "file", "a") is None


def test_broken_blueprints_are_logged(agents_dir, caplog):
    write_agent(agents_dir / "bad", b"{")
    (agents_dir / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="coordinator.agents"):
        assert agents.list_agents(agents_dir) == []
        assert agents.read_agent(agents_dir, "bad") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all(m.startswith("Skipping agent directory") for m in messages)
    assert agents.read_agent(agents_dir, "missing") is None
    assert len(caplog.records) == 3  # a missing directory is not worth a warning


def test_timestamps_from_agent_json(agents_dir):
    agent_dir = write_agent(agents_dir / "a", {"name": "a", "description": "d"})
    os.utime(agent_dir / "agent.json", (1_700_000_000.5, 1_700_000_000.5))
    agent = agents.read_agent(agents_dir, "a")
    assert agent.modified_at == datetime.fromtimestamp(1_700_000_000.5).isoformat(timespec="microseconds")
    ctime = (agent_dir / "agent.json").stat().st_ctime
    assert agent.created_at == datetime.fromtimestamp(ctime).isoformat(timespec="microseconds")


def test_status_marker(agents_dir):
    agent_dir = write_agent(agents_dir / "a", {"name": "a", "description": "d"})
    assert agents.set_status(agents_dir, "a", "inactive").status == "inactive"
    assert (agent_dir / ".disabled").read_bytes() == b""
    assert agents.set_status(agents_dir, "a", "active").status == "active"
    assert sorted(p.name for p in agent_dir.iterdir()) == ["agent.json"]


def test_delete_leaves_nothing(agents_dir):
    agents.create_agent(agents_dir, CreateAgent(name="a", description="d", system_prompt="p"))
    agents.delete_agent(agents_dir, "a")
    assert list(agents_dir.iterdir()) == []
    with pytest.raises(NotFound, match="Agent not found: a"):
        agents.delete_agent(agents_dir, "a")
