"""`execution_mode` of POST /sessions: kept as sent, `sync` when absent or null."""

import pytest


def modes(server, session_id: str) -> list[str]:
    """The session's mode as GET /sessions/{id} and GET /sessions report it."""
    one = server.get(f"/sessions/{session_id}").json()["session"]["execution_mode"]
    listed = [s["execution_mode"] for s in server.get("/sessions").json()["sessions"] if s["session_id"] == session_id]
    return [one, *listed]


@pytest.mark.parametrize("mode", ["sync", "async_poll", "async_callback"])
def test_mode_is_stored_and_returned(server, mode):
    r = server.post("/sessions", {"session_id": "s", "execution_mode": mode})
    assert r.status_code == 200, r.text
    assert r.json()["session"]["execution_mode"] == mode
    assert modes(server, "s") == [mode, mode]


@pytest.mark.parametrize("body", [{}, {"execution_mode": None}], ids=["absent", "null"])
def test_mode_defaults_to_sync(server, body):
    r = server.post("/sessions", {"session_id": "s", **body})
    assert r.status_code == 200, r.text
    assert r.json()["session"]["execution_mode"] == "sync"
    assert modes(server, "s") == ["sync", "sync"]
