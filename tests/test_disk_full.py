"""A database that cannot grow answers writes with a clear JSON error, stores nothing, logs one
line, keeps the connection open, and takes writes again once there is room, without a restart.
Real limits: SQLite's page cap (`DATABASE_MAX_MB`, SQLITE_FULL) and the process's file size
limit (RLIMIT_FSIZE, an I/O error on write)."""

import http.client
import json
import resource
from contextlib import closing

from server_process import ServerProcess
from test_sessions import event

PAD = "x" * 64 * 1024


class Client:
    """One keep-alive connection; `sock` tells whether it is still the same one."""

    def __init__(self, server: ServerProcess):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.conn.connect()
        self.sock = self.conn.sock

    def send(self, method: str, path: str, body=None) -> tuple[int, dict | list | None]:
        payload = None if body is None else json.dumps(body)
        self.conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        raw = response.read()
        assert not response.will_close and self.conn.sock is self.sock, "the connection was closed"
        return response.status, json.loads(raw) if raw else None

    def add_event(self, session_id: str) -> tuple[int, dict]:
        return self.send("POST", f"/sessions/{session_id}/events", event(session_id, tool_input={"pad": PAD}))

    def count_events(self, session_id: str) -> int:
        status, body = self.send("GET", f"/sessions/{session_id}/events")
        assert status == 200
        return len(body["events"])

    def close(self) -> None:
        self.conn.close()


def fill(client: Client, session_id: str) -> tuple[int, int, dict]:
    """Add events until one fails: (events stored, status, body of the failure)."""
    for stored in range(200):
        status, body = client.add_event(session_id)
        if status != 200:
            return stored, status, body
    raise AssertionError("the storage never filled up")


def store_errors(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if " ERROR coordinator.store: " in line]


def test_database_cap_answers_507_until_space_is_freed(tmp_path):
    with ServerProcess(tmp_path / "project", DATABASE_MAX_MB="1") as server, closing(Client(server)) as client:
        for session_id in ("filler", "keep"):
            assert client.send("POST", "/sessions", {"session_id": session_id})[0] == 200
        stored, status, body = fill(client, "filler")
        full = {"detail": "Storage full: nothing was stored; retry once space is freed"}
        assert stored > 0 and (status, body) == (507, full)
        assert client.add_event("keep") == (507, full)
        assert client.count_events("filler") == stored and client.count_events("keep") == 0
        log = server.log()
        assert "Traceback" not in log, log
        assert [line.endswith("database or disk is full") for line in store_errors(server)] == [True, True], log
        assert server.db_path.stat().st_size <= 1024 * 1024

        # Deleting a session frees its pages; the next write takes them, same connection.
        assert client.send("DELETE", "/sessions/filler")[0] == 200
        assert client.add_event("keep")[0] == 200
        assert client.count_events("keep") == 1


def test_io_error_answers_503_until_the_limit_is_lifted(tmp_path):
    with ServerProcess(tmp_path / "project") as server, closing(Client(server)) as client:
        assert client.send("POST", "/sessions", {"session_id": "s"})[0] == 200
        files = [server.db_path, server.db_path.with_name("observability.db-wal"), server.log_path]
        # Every file the server writes may grow 256 KiB more, then a write fails with EFBIG.
        limit = max(path.stat().st_size for path in files) + 256 * 1024
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        stored, status, body = fill(client, "s")
        assert stored > 0 and status == 503
        assert body == {"detail": "Storage error (disk I/O error): nothing was stored; retry later"}
        assert client.count_events("s") == stored
        log = server.log()
        assert "Traceback" not in log, log
        assert [line.endswith("disk I/O error") for line in store_errors(server)] == [True], log

        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert client.add_event("s")[0] == 200
        assert client.count_events("s") == stored + 1
