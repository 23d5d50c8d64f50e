"""Symbolic links in the agents dir: links that stay inside it are followed; a blueprint whose
directory or files resolve outside it is neither served nor changed (403), and deleting it
removes the link, never what it points to."""

import os

import pytest

from test_agents import create, files, hand_made

LINKED_OUT = {"detail": "Agent linked links outside the agents directory"}


@pytest.fixture
def agents_dir(server):
    path = server.settings.agents_dir
    path.mkdir(parents=True)
    return path


@pytest.fixture
def outside(tmp_path):
    """A blueprint directory outside the agents dir, and a secret beside it."""
    (tmp_path / "secret.txt").write_text("outside secret")
    return hand_made(tmp_path, "elsewhere", {"name": "linked", "description": "d"}, prompt="outside prompt")


def assert_refused(server, outside_files):
    r = server.get("/agents/linked")
    assert (r.status_code, r.json()) == (403, LINKED_OUT)
    r = server.patch("/agents/linked", {"description": "changed", "system_prompt": "changed"})
    assert (r.status_code, r.json()) == (403, LINKED_OUT)
    r = server.patch("/agents/linked/status", {"status": "inactive"})
    assert (r.status_code, r.json()) == (403, LINKED_OUT)
    r = server.get("/agents")
    assert [agent["name"] for agent in r.json()] == ["plain"] and "outside" not in r.text
    assert outside_files()


def test_directory_linked_outside_is_refused_and_delete_removes_the_link(server, agents_dir, outside):
    create(server, "plain")
    (agents_dir / "linked").symlink_to(outside)
    before = files(outside)
    assert_refused(server, lambda: files(outside) == before)

    assert server.delete("/agents/linked").status_code == 204
    assert sorted(os.listdir(agents_dir)) == ["plain"] and files(outside) == before


def test_file_linked_outside_is_refused(server, agents_dir, outside, tmp_path):
    create(server, "plain")
    linked = hand_made(agents_dir, "linked", {"name": "linked", "description": "d"})
    (linked / "agent.system-prompt.md").symlink_to(tmp_path / "secret.txt")
    assert_refused(server, lambda: (tmp_path / "secret.txt").read_text() == "outside secret")

    # A marker linked outside would be touched there by a status change: refused as well.
    (linked / "agent.system-prompt.md").unlink()
    (linked / ".disabled").symlink_to(tmp_path / "marker")
    assert_refused(server, lambda: not (tmp_path / "marker").exists())

    assert server.delete("/agents/linked").status_code == 204
    assert sorted(os.listdir(agents_dir)) == ["plain"]
    assert (tmp_path / "secret.txt").read_text() == "outside secret"


def test_links_inside_the_agents_dir_are_followed(server, agents_dir):
    create(server, "plain", system_prompt="shared prompt")
    (agents_dir / "alias").symlink_to(agents_dir / "plain")
    served = server.get("/agents/alias").json()
    assert (served["name"], served["system_prompt"]) == ("plain", "shared prompt")

    r = server.patch("/agents/alias", {"description": "changed"})
    assert r.status_code == 200 and r.json()["description"] == "changed"
    assert server.get("/agents/plain").json()["description"] == "changed"

    assert server.delete("/agents/alias").status_code == 204
    assert sorted(os.listdir(agents_dir)) == ["plain"]
    assert server.get("/agents/plain").json()["description"] == "changed"


def test_an_agents_dir_that_is_a_link_works(make_server, tmp_path):
    real = tmp_path / "real-agents"
    real.mkdir()
    (tmp_path / "agents-link").symlink_to(real)
    server = make_server(agents_dir_override=tmp_path / "agents-link")
    create(server, "a", system_prompt="p")
    assert server.get("/agents/a").json()["system_prompt"] == "p"
    assert server.patch("/agents/a", {"description": "e"}).json()["description"] == "e"
    assert (real / "a" / "agent.json").exists()
