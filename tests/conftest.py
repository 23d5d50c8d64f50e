"""Shared fixtures: the real app under uvicorn on an ephemeral loopback port, a temp project dir,
and the backend it stores into.

Every test that uses a server or a store (`make_server`, `server`, `store_db`, `database_url`,
`server_env`) runs twice, `[sqlite]` and `[postgres]`, unless marked `sqlite_only` (it looks at
what only SQLite has: the file, its pragmas, its writer thread). The PostgreSQL runs use a fresh
schema of a database of this run's own (see postgres_server).
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
from pathlib import Path

import pytest
import requests

from coordinator import Server, create_app, server_config
from coordinator_core.settings import Settings
from store.sqlite import SqliteDatabase

BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        backends = BACKENDS[:1] if metafunc.definition.get_closest_marker("sqlite_only") else BACKENDS
        metafunc.parametrize("backend", backends)


@pytest.fixture(scope="session")
def postgres_database():
    """This run's own PostgreSQL database, made on first use (postgres_server.RunDatabase)."""
    from postgres_server import RunDatabase

    database = RunDatabase()
    yield database
    database.drop()


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """The `COORDINATOR_DATABASE_URL` of this test: an empty PostgreSQL schema, or None (SQLite)."""
    if backend == "sqlite":
        return None
    return request.getfixturevalue("postgres_database").fresh_schema()


@pytest.fixture
def server_env(database_url: str | None) -> dict[str, str]:
    """Environment for a `ServerProcess` on the test's backend."""
    return {} if database_url is None else {"COORDINATOR_DATABASE_URL": database_url}


@pytest.fixture
def store_db(database_url: str | None, tmp_path: Path):
    """A `store.backend.Database` on the test's backend, without a server."""
    if database_url is None:
        database = SqliteDatabase(tmp_path / "observability.db")
    else:
        from store.postgres import PostgresDatabase

        database = PostgresDatabase(database_url)
    yield database
    database.close()


class RunningServer:
    """A coordinator served by uvicorn in a background thread; `url` is its base address."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        # As `python -m coordinator` serves it, on the socket bound here.
        config = server_config(self.app, settings, "127.0.0.1", self.port, log_level="warning", lifespan="on")
        self._server = Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]})

    @property
    def state(self):
        return self.app.state

    def start(self) -> RunningServer:
        self._thread.start()
        # `started` flips once the lifespan ran and the socket listens; bounded wait.
        for _ in range(1000):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self._server.started:
            raise RuntimeError("server did not start")
        return self

    def stop(self) -> None:
        self._server.handle_exit(signal.SIGTERM, None)  # what a SIGTERM does (signals reach the main thread only)
        self._thread.join(timeout=15)
        self._sock.close()

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, json=None, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=30, **kwargs)

    def patch(self, path: str, json=None, **kwargs) -> requests.Response:
        return requests.patch(self.url + path, json=json, timeout=30, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return requests.delete(self.url + path, timeout=30, **kwargs)


class HeldRunWrites:
    """Holds back the server's writes to runs until `release()`: on SQLite the one writer is
    kept busy, on PostgreSQL a transaction holds the runs table locked against writes."""

    def __init__(self, server: RunningServer):
        self._gate = threading.Event()
        self._db = server.state.db
        self._url = server.settings.database_url
        if self._url is None:
            self._db.submit(lambda conn: self._gate.wait(10))
            return
        import psycopg

        locked = threading.Event()

        def hold() -> None:
            with psycopg.connect(self._url) as conn:
                conn.execute("LOCK TABLE runs IN EXCLUSIVE MODE")
                locked.set()
                self._gate.wait(10)

        threading.Thread(target=hold, daemon=True).start()
        assert locked.wait(10), "the runs table was not locked"

    def waiting(self) -> bool:
        """Whether a write waits behind the hold."""
        if self._url is None:
            return self._db._writes.qsize() > 0
        sql = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = 'runs'::regclass)"
        return self._db.read_sync(lambda conn: conn.execute(sql).fetchone()[0])

    def release(self) -> None:
        self._gate.set()


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    return tmp_path / "project"


@pytest.fixture
def make_server(project_dir: Path, database_url: str | None):
    """Start servers with settings overrides: `make_server(runner_poll_timeout=1)`."""
    started: list[RunningServer] = []

    def factory(**overrides) -> RunningServer:
        defaults = Settings(project_dir=project_dir, host="127.0.0.1", database_url=database_url)
        settings = dataclasses.replace(defaults, **overrides)
        server = RunningServer(settings).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server) -> RunningServer:
    return make_server()
