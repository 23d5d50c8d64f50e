"""What a crash in the middle of an agent write leaves in the agents dir (hidden temp names) is
removed at the next start; blueprints and anything else in the directory are left alone."""

import os

from server_process import ServerProcess
from store.agents import _temp_path


def test_start_removes_leftovers_of_interrupted_writes(tmp_path):
    server = ServerProcess(tmp_path / "project")
    agents_dir = server.project_dir / ".agent-orchestrator" / "agents"
    with server:
        for name in ("kept", "other"):
            r = server.post("/agents", {"name": name, "description": "d", "system_prompt": "p"})
            assert r.status_code == 201, r.text
        before = server.get("/agents").json()
    blueprint = {name: sorted(os.listdir(agents_dir / name)) for name in ("kept", "other")}

    # As a SIGKILL leaves them: a new agent half staged, a deleted one (a directory and a
    # link) renamed away but not removed, a PATCH's temp file not yet renamed over.
    staged = _temp_path(agents_dir / "new")
    staged.mkdir()
    (staged / "agent.json").write_text('{"name": "new", "description": "d"}')
    trashed = _temp_path(agents_dir / "gone")
    trashed.mkdir()
    (trashed / "agent.json").write_text('{"name": "gone", "description": "d"}')
    (tmp_path / "linked-target").mkdir()
    trashed_link = _temp_path(agents_dir / "linked")
    trashed_link.symlink_to(tmp_path / "linked-target")
    patch_temp = _temp_path(agents_dir / "kept" / "agent.system-prompt.md")
    patch_temp.write_text("half a prompt")
    leftovers = [staged, trashed, trashed_link, patch_temp]
    # Not the store's: hidden or temp-like names it never makes.
    strangers = [agents_dir / ".git", agents_dir / ".notes.tmp", agents_dir / "kept" / ".agent.json.tmp",
                 agents_dir / "kept" / ".notes.0123456789ab.tmp", agents_dir / ".a b.0123456789ab.tmp"]
    for path in strangers:
        path.mkdir() if path.name == ".git" else path.write_text("mine")

    with server:
        assert [os.path.lexists(path) for path in leftovers] == [False] * len(leftovers)
        assert all(path.exists() for path in strangers)
        assert (tmp_path / "linked-target").is_dir()
        assert {name: sorted(os.listdir(agents_dir / name)) for name in ("kept", "other")} == {
            "kept": sorted(blueprint["kept"] + [".agent.json.tmp", ".notes.0123456789ab.tmp"]),
            "other": blueprint["other"],
        }
        assert server.get("/agents").json() == before
    log = server.log()
    assert sum("left by an interrupted agent write" in line for line in log.splitlines()) == 4, log
