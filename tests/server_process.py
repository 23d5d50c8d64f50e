"""A coordinator in its own process (`python -m coordinator`), for tests that kill it and for
the benchmark: start it with an environment and a project dir, wait until /health answers, and
stop it gently (SIGTERM) or hard (SIGKILL). It stores in SQLite unless the environment given
names a PostgreSQL database (the `server_env` fixture does, on that backend)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import apsw
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(project_dir, RUNNER_POLL_TIMEOUT="2") as server: server.get(...)`.

    The port is chosen once, so a restarted server (`start()` after `kill()`) answers at the
    same `url`. Output goes to `log_path` (read it with `log()`)."""

    def __init__(self, project_dir: Path, startup_timeout: float = 20.0, **env: str):
        self.project_dir = Path(project_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_DATABASE_URL")}
        self.env = {**inherited, "AGENT_ORCHESTRATOR_PROJECT_DIR": str(self.project_dir), **env}
        self.startup_timeout = startup_timeout
        self.log_path = self.project_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def db_path(self) -> Path:
        return self.project_dir / ".agent-orchestrator" / "observability.db"

    @property
    def database_url(self) -> str | None:
        return self.env.get("COORDINATOR_DATABASE_URL")

    def execute(self, sql: str, rows: list) -> None:
        """Run a statement (SQLite's placeholders) once per row straight on the database, as
        another program would, e.g. while the server is down."""
        if self.database_url is None:
            conn = apsw.Connection(str(self.db_path))
            conn.executemany(sql, rows)
            conn.close()
            return
        import psycopg

        from store.postgres import translate

        with psycopg.connect(self.database_url) as conn:
            conn.cursor().executemany(translate(sql), rows)

    def start(self, **env: str) -> ServerProcess:
        """Start (again), with extra environment for this start; returns once /health answers."""
        self.project_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not answer within {self.startup_timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown."""
        self._end(signal.SIGTERM)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, json=None, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=kwargs.pop("timeout", 30), **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return requests.delete(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)
