"""Agent blueprints over HTTP: the files on disk are checked byte for byte."""

import http.client
import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

AGENT_KEYS = ["name", "description", "system_prompt", "mcp_servers", "skills", "tags", "demands", "status",
              "created_at", "modified_at"]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")


@pytest.fixture
def agents_dir(server) -> Path:
    return server.settings.agents_dir


def create(server, name, description="does things", **fields):
    r = server.post("/agents", {"name": name, "description": description, **fields})
    assert r.status_code == 201, r.text
    return r.json()


def files(agent_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(agent_dir.iterdir())}


def dump(data) -> bytes:
    """The on-disk JSON format: 2-space indent, ASCII escapes, trailing newline."""
    return (json.dumps(data, indent=2) + "\n").encode()


def hand_made(agents_dir: Path, dirname: str, agent=None, prompt=None, mcp=None) -> Path:
    """A blueprint directory written by hand: each file is text, bytes, or data to dump; None = absent."""
    d = agents_dir / dirname
    d.mkdir(parents=True)
    for filename, content in [("agent.json", agent), ("agent.system-prompt.md", prompt), ("agent.mcp.json", mcp)]:
        if content is not None:
            raw = content.encode() if isinstance(content, str) else content
            (d / filename).write_bytes(raw if isinstance(raw, bytes) else dump(raw))
    return d


def raw_request(server, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """Send `path` exactly as given (requests would normalise `..` segments away)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- create and read ----------------------------------------------------------------------


def test_no_agents_dir_means_no_agents(server, agents_dir):
    assert not agents_dir.exists()
    assert server.get("/agents").json() == []
    assert server.get("/agents/ghost").status_code == 404
    assert not agents_dir.exists()  # reads never create it


def test_create_full_writes_reference_files(server, agents_dir):
    body = {
        "name": "researcher",
        "description": "Finds things – fast",
        "system_prompt": "You research.\r\nNo trailing newline",
        "mcp_servers": {
            "files": {"command": "npx", "args": ["-y", "fs"], "env": {"ROOT": "/tmp"}},
            "web": {"type": "http", "url": "http://localhost:9000/mcp", "headers": {"X-Key": "k"}},
        },
        "skills": ["search"],
        "tags": ["web", "research"],
        "demands": {"hostname": "h1", "project_dir": None, "tags": ["gpu"]},
        "ignored": True,
    }
    r = server.post("/agents", body)
    assert r.status_code == 201
    agent = r.json()
    assert list(agent) == AGENT_KEYS
    assert agent["mcp_servers"] == {
        "files": {"type": "stdio", "command": "npx", "args": ["-y", "fs"], "env": {"ROOT": "/tmp"}},
        "web": {"type": "http", "url": "http://localhost:9000/mcp", "headers": {"X-Key": "k"}},
    }
    assert agent["demands"] == {"hostname": "h1", "tags": ["gpu"]}
    assert agent["status"] == "active"
    assert STAMP.match(agent["created_at"]) and STAMP.match(agent["modified_at"])
    assert files(agents_dir / "researcher") == {
        "agent.json": b'{\n  "name": "researcher",\n  "description": "Finds things \\u2013 fast",\n'
                      b'  "skills": [\n    "search"\n  ],\n  "tags": [\n    "web",\n    "research"\n  ],\n'
                      b'  "demands": {\n    "hostname": "h1",\n    "tags": [\n      "gpu"\n    ]\n  }\n}\n',
        "agent.mcp.json": dump({"mcpServers": agent["mcp_servers"]}),
        "agent.system-prompt.md": b"You research.\r\nNo trailing newline",
    }
    assert server.get("/agents/researcher").json() == agent


def test_create_minimal(server, agents_dir):
    agent = create(server, "mini", skills=[], tags=[], system_prompt="", mcp_servers={}, demands=None)
    assert list(agent) == ["name", "description", "tags", "status", "created_at", "modified_at"]
    assert agent["tags"] == []
    assert files(agents_dir / "mini") == {"agent.json": dump({"name": "mini", "description": "does things"})}


def test_create_empty_demands_written_with_tags(server, agents_dir):
    agent = create(server, "d", demands={})
    assert agent["demands"] == {"tags": []}
    assert json.loads((agents_dir / "d" / "agent.json").read_bytes())["demands"] == {"tags": []}


def test_create_makes_missing_agents_dir(server, agents_dir):
    assert not agents_dir.exists()
    create(server, "first")
    assert [p.name for p in agents_dir.iterdir()] == ["first"]


BAD_NAMES = [
    ("", "Agent name is required"),
    ("a" * 61, "Agent name must be 60 characters or less"),
    ("-lead", "must start with letter/number"),
    ("a b", "only alphanumeric"),
    ("a.b", "only alphanumeric"),
    ("trailing\n", "only alphanumeric"),
    ("caf\u00e9", "only alphanumeric"),
]


def test_create_bad_name_is_400(server, agents_dir):
    for name, detail in BAD_NAMES:
        r = server.post("/agents", {"name": name, "description": "x"})
        assert r.status_code == 400 and detail in r.json()["detail"], name
    assert not agents_dir.exists()


def test_create_longest_name(server):
    assert create(server, "A" * 60)["name"] == "A" * 60


def test_create_conflict(server, agents_dir):
    create(server, "dup")
    r = server.post("/agents", {"name": "dup", "description": "other"})
    assert (r.status_code, r.json()) == (409, {"detail": "Agent already exists: dup"})
    (agents_dir / "bare").mkdir()  # any existing directory takes the name
    assert server.post("/agents", {"name": "bare", "description": "x"}).status_code == 409
    assert json.loads((agents_dir / "dup" / "agent.json").read_bytes())["description"] == "does things"


INVALID_BODIES = [
    {"name": "x"},
    {"description": "no name"},
    {"name": "x", "description": ""},
    {"name": "x", "description": 5},
    {"name": "x", "description": "d", "tags": "web"},
    {"name": "x", "description": "d", "demands": {"tags": "gpu"}},
    {"name": "x", "description": "d", "mcp_servers": {"s": {"command": "c"}}},
    {"name": "x", "description": "d", "mcp_servers": {"s": {"command": "c", "args": [], "url": "u"}}},
    {"name": "x", "description": "d", "mcp_servers": {"s": {"type": "http"}}},
    {"name": "x", "description": "d", "mcp_servers": {"s": {"type": "sse", "url": "u"}}},
    {"name": "x", "description": "d", "mcp_servers": {"s": "npx"}},
    {"name": "x", "description": "d", "mcp_servers": []},
    ["name", "x"],
]


def test_create_invalid_body_is_422(server, agents_dir):
    for body in INVALID_BODIES:
        r = server.post("/agents", body)
        assert r.status_code == 422, (body, r.text)
        assert all(item["loc"][0] == "body" and item["msg"] for item in r.json()["detail"])
    assert not agents_dir.exists()


def test_invalid_body_beats_bad_name(server):
    # Decoding comes first (422), then the name (400), then existence (409).
    assert server.post("/agents", {"name": "../x"}).status_code == 422


def test_malformed_json_is_422(server):
    r = server.post("/agents", data=b"{nope")
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_get_unknown_is_404(server):
    r = server.get("/agents/ghost")
    assert (r.status_code, r.json()) == (404, {"detail": "Agent not found: ghost"})


# -- PATCH -----------------------------------------------------------------------------------


@pytest.fixture
def full(server, agents_dir) -> Path:
    create(
        server, "full",
        system_prompt="prompt",
        mcp_servers={"s": {"command": "c", "args": []}},
        skills=["s1"],
        tags=["t1"],
        demands={"executor_type": "claude-code"},
    )
    return agents_dir / "full"


def agent_json(agent_dir: Path) -> dict:
    return json.loads((agent_dir / "agent.json").read_bytes())


def test_patch_empty_body_changes_nothing(server, full):
    before = files(full)
    r = server.patch("/agents/full", {})
    assert r.status_code == 200
    assert files(full) == before
    assert r.json() == server.get("/agents/full").json()


def test_patch_nulls_leave_everything(server, full):
    before = files(full)
    nulls = dict.fromkeys(["description", "system_prompt", "mcp_servers", "skills", "tags"])
    assert server.patch("/agents/full", nulls).status_code == 200
    assert files(full) == before


def test_patch_description(server, full):
    assert server.patch("/agents/full", {"description": "new"}).json()["description"] == "new"
    assert agent_json(full)["description"] == "new"


def test_patch_empty_description_is_422(server, full):
    before = files(full)
    r = server.patch("/agents/full", {"description": ""})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "description"]
    assert files(full) == before


@pytest.mark.parametrize("key", ["skills", "tags"])
def test_patch_lists(server, full, key):
    assert server.patch("/agents/full", {key: ["a", "b"]}).json()[key] == ["a", "b"]
    assert agent_json(full)[key] == ["a", "b"]
    agent = server.patch("/agents/full", {key: []}).json()
    assert key not in agent_json(full)
    assert agent.get(key, []) == []  # tags stays present as [], skills is omitted


def test_patch_demands(server, full):
    agent = server.patch("/agents/full", {"demands": {"hostname": "h2", "tags": ["x"]}}).json()
    assert agent["demands"] == {"hostname": "h2", "tags": ["x"]}
    assert agent_json(full)["demands"] == {"hostname": "h2", "tags": ["x"]}
    assert server.patch("/agents/full", {"description": "d"}).json()["demands"] == agent["demands"]  # absent
    assert "demands" not in server.patch("/agents/full", {"demands": {"hostname": None}}).json()  # empty clears
    assert "demands" not in agent_json(full)
    server.patch("/agents/full", {"demands": {"tags": ["y"]}})
    assert "demands" not in server.patch("/agents/full", {"demands": None}).json()  # explicit null clears
    assert "demands" not in agent_json(full)


def test_patch_system_prompt(server, full):
    assert server.patch("/agents/full", {"system_prompt": "new\n"}).json()["system_prompt"] == "new\n"
    assert (full / "agent.system-prompt.md").read_bytes() == b"new\n"
    assert "system_prompt" not in server.patch("/agents/full", {"system_prompt": ""}).json()
    assert not (full / "agent.system-prompt.md").exists()


def test_patch_mcp_servers(server, full):
    servers = {"h": {"type": "http", "url": "http://x"}}
    assert server.patch("/agents/full", {"mcp_servers": servers}).json()["mcp_servers"] == servers
    assert (full / "agent.mcp.json").read_bytes() == dump({"mcpServers": servers})
    assert "mcp_servers" not in server.patch("/agents/full", {"mcp_servers": {}}).json()
    assert not (full / "agent.mcp.json").exists()


def test_patch_keeps_unknown_keys_and_name(server, agents_dir):
    d = hand_made(agents_dir, "keeper", {"name": "keeper", "description": "d", "custom": {"k": [1, 2.5]}})
    # what the dashboard sends: the whole form, `name` included
    form = {"name": "renamed", "description": "e", "system_prompt": "", "mcp_servers": {}, "skills": [],
            "tags": ["t"], "demands": None}
    agent = server.patch("/agents/keeper", form).json()
    assert agent["name"] == "keeper"
    assert (d / "agent.json").read_bytes() == dump(
        {"name": "keeper", "description": "e", "custom": {"k": [1, 2.5]}, "tags": ["t"]}
    )


def test_patch_unknown_or_incomplete_is_404(server, agents_dir):
    r = server.patch("/agents/ghost", {"description": "x"})
    assert (r.status_code, r.json()) == (404, {"detail": "Agent not found: ghost"})
    empty = hand_made(agents_dir, "empty", prompt="p")
    assert server.patch("/agents/empty", {"description": "x"}).status_code == 404
    assert files(empty) == {"agent.system-prompt.md": b"p"}


def test_patch_bad_mcp_is_422_and_writes_nothing(server, full):
    before = files(full)
    r = server.patch("/agents/full", {"description": "new", "mcp_servers": {"s": {"url": "u"}}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "mcp_servers"]
    assert files(full) == before


def test_patch_replaces_files_rather_than_rewriting_them(server, full):
    # A hard link keeps the old inode: if it still holds the old bytes, the write went through a
    # new file renamed over agent.json, never a truncate-and-rewrite a crash could cut short.
    link = full.parent / "old-agent.json"
    os.link(full / "agent.json", link)
    before = link.read_bytes()
    server.patch("/agents/full", {"description": "after"})
    assert link.read_bytes() == before
    assert agent_json(full)["description"] == "after"
    assert sorted(files(full)) == ["agent.json", "agent.mcp.json", "agent.system-prompt.md"]  # no temp files


def test_concurrent_patches_leave_a_valid_agent(server, full):
    start = threading.Barrier(51)
    statuses, reads = [], []

    def patch(i):
        start.wait()
        r = server.patch("/agents/full", {"description": f"d{i}", "tags": [f"t{i}"], "system_prompt": f"p{i}"})
        statuses.append(r.status_code)

    def read():
        start.wait()
        while len(statuses) < 50:
            reads.append(server.get("/agents/full").status_code)

    threads = [threading.Thread(target=patch, args=(i,)) for i in range(50)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 50
    assert set(reads) <= {200}  # a reader never sees a missing or half-written agent.json
    data = agent_json(full)
    i = data["description"][1:]
    assert data["tags"] == [f"t{i}"] and data["name"] == "full"
    assert (full / "agent.system-prompt.md").read_text() == f"p{i}"  # each PATCH applied whole
    assert sorted(files(full)) == ["agent.json", "agent.mcp.json", "agent.system-prompt.md"]


# -- status and delete ----------------------------------------------------------------------


def test_status_toggle(server, full):
    r = server.patch("/agents/full/status", {"status": "inactive"})
    assert r.status_code == 200 and r.json()["status"] == "inactive"
    assert (full / ".disabled").read_bytes() == b""
    assert [a["status"] for a in server.get("/agents").json()] == ["inactive"]  # inactive still listed
    assert server.patch("/agents/full/status", {"status": "inactive"}).json()["status"] == "inactive"
    assert server.patch("/agents/full/status", {"status": "active"}).json()["status"] == "active"
    assert not (full / ".disabled").exists()
    assert server.patch("/agents/full/status", {"status": "active"}).status_code == 200


def test_status_errors(server, full, agents_dir):
    assert server.patch("/agents/full/status", {"status": "paused"}).status_code == 422
    assert server.patch("/agents/full/status", {}).status_code == 422
    r = server.patch("/agents/ghost/status", {"status": "inactive"})
    assert (r.status_code, r.json()) == (404, {"detail": "Agent not found: ghost"})
    hand_made(agents_dir, "broken", "{")
    assert server.patch("/agents/broken/status", {"status": "inactive"}).status_code == 404
    assert not (agents_dir / "broken" / ".disabled").exists()


def test_delete(server, full, agents_dir):
    r = server.delete("/agents/full")
    assert (r.status_code, r.content) == (204, b"")
    assert list(agents_dir.iterdir()) == []
    assert server.get("/agents/full").status_code == 404
    r = server.delete("/agents/full")
    assert (r.status_code, r.json()) == (404, {"detail": "Agent not found: full"})


def test_delete_removes_a_broken_directory(server, agents_dir):
    hand_made(agents_dir, "broken", "not json")
    assert server.get("/agents/broken").status_code == 404
    assert server.delete("/agents/broken").status_code == 204
    assert list(agents_dir.iterdir()) == []


# -- list and tags ----------------------------------------------------------------------------


def test_list_sorted_with_tags_filter(server):
    create(server, "b", tags=["web", "Fast"])
    create(server, "a", tags=["web"])
    create(server, "c")
    server.patch("/agents/b/status", {"status": "inactive"})

    def names(query=""):
        r = server.get("/agents" + query)
        assert r.status_code == 200
        return [a["name"] for a in r.json()]

    assert names() == ["a", "b", "c"]
    assert names("?tags=web") == ["a", "b"]
    assert names("?tags=web,Fast") == ["b"]  # AND
    assert names("?tags= web , ,Fast ") == ["b"]  # stripped, empties dropped
    assert names("?tags=fast") == []  # case-sensitive
    assert names("?tags=web,nope") == []
    assert names("?tags=") == names("?tags=,%20,") == ["a", "b", "c"]


# -- hand-made directories --------------------------------------------------------------------


def test_hand_made_directories(server, agents_dir, caplog):
    hand_made(
        agents_dir, "good", {"name": "good", "description": "d", "demands": {"hostname": "h", "extra": 1}},
        mcp=dump({"mcpServers": {"s": {"command": "c", "args": ["a"]}, "h": {"type": "http", "url": "u"}}}),
    )
    hand_made(agents_dir, "lenient", {"name": "lenient", "description": "d", "tags": None, "demands": {}},
              mcp=dump({"mcpServers": {}}))
    broken = {
        "no-json": None,
        "not-json": "{",
        "not-object": "[1]",
        "no-description": {"name": "no-description"},
        "empty-description": {"name": "empty-description", "description": ""},
        "empty-name": {"name": "", "description": "d"},
        "bad-tags": {"name": "bad-tags", "description": "d", "tags": "web"},
        "bad-demands": {"name": "bad-demands", "description": "d", "demands": {"tags": "gpu"}},
        "demands-list": {"name": "demands-list", "description": "d", "demands": ["h"]},
    }
    for dirname, content in broken.items():
        hand_made(agents_dir, dirname, content, prompt="p")
    bad_mcp = {
        "mcp-not-json": "{",
        "mcp-not-object": "[]",
        "mcp-no-args": dump({"mcpServers": {"s": {"command": "c"}}}),
        "mcp-unknown-key": dump({"mcpServers": {"s": {"command": "c", "args": [], "cwd": "/"}}}),
        "mcp-bad-type": dump({"mcpServers": {"s": {"type": "sse", "url": "u"}}}),
        "mcp-entry-string": dump({"mcpServers": {"s": "npx"}}),
    }
    for dirname, mcp in bad_mcp.items():
        hand_made(agents_dir, dirname, {"name": dirname, "description": "d"}, mcp=mcp)
    hand_made(agents_dir, "bad-prompt", {"name": "bad-prompt", "description": "d"}, prompt=b"\xff\xfe")
    (agents_dir / "plain-file").write_text("{}")
    hand_made(agents_dir, ".hidden", {"name": "hidden", "description": "d"})

    listed = server.get("/agents").json()
    assert [a["name"] for a in listed] == ["good", "lenient"]
    good, lenient = listed
    assert good["mcp_servers"] == {"s": {"type": "stdio", "command": "c", "args": ["a"]},
                                   "h": {"type": "http", "url": "u"}}
    assert good["demands"] == {"hostname": "h", "tags": []}
    assert list(lenient) == ["name", "description", "tags", "status", "created_at", "modified_at"]
    for dirname in [*broken, *bad_mcp, "bad-prompt", "plain-file"]:
        r = server.get(f"/agents/{dirname}")
        assert (r.status_code, r.json()) == (404, {"detail": f"Agent not found: {dirname}"})
        assert server.patch(f"/agents/{dirname}", {"description": "x"}).status_code == 404
    skipped = {r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "WARNING"}
    assert {f"Skipping agent directory {agents_dir / d}" for d in [*broken, *bad_mcp]} <= skipped


def test_hand_edits_show_on_next_request(server, agents_dir):
    d = hand_made(agents_dir, "manual", {"name": "manual", "description": "v1"})
    assert server.get("/agents/manual").json()["description"] == "v1"
    (d / "agent.json").write_bytes(dump({"name": "manual", "description": "v2", "tags": ["new"]}))
    (d / "agent.system-prompt.md").write_text("hello")
    agent = server.get("/agents/manual").json()
    assert (agent["description"], agent["tags"], agent["system_prompt"]) == ("v2", ["new"], "hello")
    (d / ".disabled").touch()
    assert server.get("/agents").json()[0]["status"] == "inactive"
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    assert server.get("/agents").json() == []
    assert server.get("/agents/manual").status_code == 404


def test_name_comes_from_the_file(server, agents_dir):
    hand_made(agents_dir, "dir-name", {"name": "file-name", "description": "d"})
    assert [a["name"] for a in server.get("/agents").json()] == ["file-name"]
    assert server.get("/agents/dir-name").json()["name"] == "file-name"


def test_reference_directory_served_unchanged(server, agents_dir):
    d = hand_made(
        agents_dir, "ref",
        {"name": "ref", "description": "R\u00e9f", "skills": ["s"], "tags": ["t"],
         "demands": {"project_dir": "/p", "tags": []}},
        prompt="Line one\n\nLine two\n",
        mcp=dump({"mcpServers": {"x": {"type": "stdio", "command": "c", "args": [], "env": {"A": "1"}}}}),
    )
    (d / ".disabled").touch()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()}
    agent = server.get("/agents/ref").json()
    assert agent == {
        "name": "ref", "description": "R\u00e9f", "system_prompt": "Line one\n\nLine two\n",
        "mcp_servers": {"x": {"type": "stdio", "command": "c", "args": [], "env": {"A": "1"}}},
        "skills": ["s"], "tags": ["t"], "demands": {"project_dir": "/p", "tags": []}, "status": "inactive",
        "created_at": agent["created_at"], "modified_at": agent["modified_at"],
    }
    assert server.get("/agents").json() == [agent]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.iterdir()} == before
    # a no-op PATCH writes agent.json back byte for byte
    assert server.patch("/agents/ref", {}).status_code == 200
    assert (d / "agent.json").read_bytes() == before["agent.json"][0]


# -- path safety -----------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for root in roots for p in [root, *root.rglob("*")]}


TRICKS = [
    "..",
    "%2E%2E",
    ".",
    "..%2Fvictim",
    "%2E%2E%2Fvictim",
    "..%5Cvictim",
    "..%2F..%2F..%2Fsentinel.txt",
    "victim%2F..%2Fvictim",
    "a%00b",
    "%00",
    "x" * 10240,
]


def test_path_tricks_never_reach_the_filesystem(server, agents_dir, tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    # a valid blueprint right next to the agents dir: `../victim` would find it
    victim = hand_made(agents_dir.parent, "victim", {"name": "victim", "description": "d"})
    create(server, "real")
    before = snapshot(sentinel, victim, agents_dir)
    absolute = quote(str(victim), safe="")
    patch = json.dumps({"description": "pwned", "system_prompt": "pwned"}).encode()
    status = json.dumps({"status": "inactive"}).encode()
    for name in [*TRICKS, absolute]:
        for method, path, body in [
            ("GET", f"/agents/{name}", None),
            ("PATCH", f"/agents/{name}", patch),
            ("DELETE", f"/agents/{name}", None),
            ("PATCH", f"/agents/{name}/status", status),
        ]:
            code, content = raw_request(server, method, path, body)
            assert code == 404, (method, path, code)
            assert "detail" in json.loads(content)
    for name in ["..", "../victim", str(victim), "victim/..", "a\x00b", "x" * 10240, ".hidden", "a\\b"]:
        r = server.post("/agents", {"name": name, "description": "pwned"})
        assert r.status_code == 400, name
    assert snapshot(sentinel, victim, agents_dir) == before
    assert sentinel.read_text() == "keep me"


def test_dot_dot_name_is_agent_404(server):
    code, content = raw_request(server, "GET", "/agents/..")
    assert (code, json.loads(content)) == (404, {"detail": "Agent not found: .."})
