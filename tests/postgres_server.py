"""A PostgreSQL server for the tests: the one `COORDINATOR_TEST_DATABASE_URL` names, or a
throwaway cluster of the tests' own, started from the server binaries (`initdb`, `pg_ctl`) in a
temp dir, reached by a unix socket there, and removed afterwards. Each test run works in a
database of its own (created with a unique name, dropped at the end), each test in a schema of
its own, so runs sharing a server never see each other and every test starts empty."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import uuid
from pathlib import Path

import psycopg

ENV = "COORDINATOR_TEST_DATABASE_URL"


def with_params(url: str, **params: str) -> str:
    """`url` with query parameters added (libpq reads `options`, `host`, `port`... from there)."""
    parts = urllib.parse.urlsplit(url)
    query = "&".join(filter(None, [parts.query, urllib.parse.urlencode(params)]))
    return urllib.parse.urlunsplit(parts._replace(query=query))


def with_database(url: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path="/" + name))


def _binaries() -> Path:
    """The directory of `initdb` and `pg_ctl`: on the PATH, or Debian's newest
    /usr/lib/postgresql/<version>/bin."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        raise RuntimeError(
            f"no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql package,"
            f" or name a server in {ENV}"
        )
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A throwaway cluster. PostgreSQL refuses to run as root: as root it runs as `nobody`.
    Durability is off (`fsync`): the tests kill coordinators, never this server."""

    def __init__(self):
        self.bin = _binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="coordinator-pg-"))  # not under a 0700 pytest dir
        self.data = self.dir / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.dir, 65534, 65534)
            self._as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        options = (f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -p {self.port}"
                   " -c fsync=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options, "-w", "start")
        self.url = with_params("postgresql://postgres@/postgres", host=str(self.dir), port=str(self.port))

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self._as_user, str(self.bin / program), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr or done.stdout}")

    def remove(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class RunDatabase:
    """This run's own database on the server, and a fresh schema in it per test."""

    def __init__(self):
        self.cluster = None if os.environ.get(ENV) else Cluster()
        self.server_url = os.environ.get(ENV) or self.cluster.url
        self.name = "coordinator_test_" + uuid.uuid4().hex[:12]
        try:
            with psycopg.connect(self.server_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
        except BaseException:
            self._remove_cluster()
            raise
        self.url = with_database(self.server_url, self.name)

    def fresh_schema(self) -> str:
        """A URL whose connections work in a new, empty schema of this run's database."""
        schema = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return with_params(self.url, options=f"-csearch_path={schema}")

    def drop(self) -> None:
        try:
            with psycopg.connect(self.server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            self._remove_cluster()

    def _remove_cluster(self) -> None:
        if self.cluster is not None:
            self.cluster.remove()
