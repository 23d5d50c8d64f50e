"""`python -m coordinator` on a data dir it cannot use stops with one line naming the path and
the cause, exit status 1, no traceback; a database of a newer release is refused untouched."""

import os
import subprocess
import sys
from pathlib import Path

import apsw

from store.sqlite import MIGRATIONS, SqliteDatabase as Database

ROOT = Path(__file__).resolve().parent.parent


def unprivileged() -> list[str]:
    """Root ignores permission bits: as root, run the server without that power (dropped from
    its capability bounding set), so that a read-only directory is read-only to it too."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


def run(project_dir: Path, *args: str, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run the command line; a server that starts instead of failing is stopped after 30 s."""
    env = {**os.environ, "AGENT_ORCHESTRATOR_PROJECT_DIR": str(project_dir)}
    command = [*prefix, sys.executable, "-m", "coordinator", *(args or ("--host", "127.0.0.1", "--port", "0"))]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return proc.returncode, stderr


def assert_one_line(status: int, stderr: str, path: Path, cause: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert status == 1, stderr
    assert stderr.splitlines() == [f"agent-coordinator: cannot use the database {path}: {cause}"]


def db_path(project_dir: Path) -> Path:
    return project_dir / ".agent-orchestrator" / "observability.db"


def test_project_dir_that_is_a_file(tmp_path):
    project = tmp_path / "project"
    project.write_text("not a directory")
    status, stderr = run(project)
    data_dir = project / ".agent-orchestrator"
    assert_one_line(status, stderr, db_path(project), f"[Errno 20] Not a directory: '{data_dir}'")
    assert project.read_text() == "not a directory"


def test_corrupt_database(tmp_path):
    path = db_path(tmp_path)
    path.parent.mkdir(parents=True)
    garbage = os.urandom(64 * 1024)
    path.write_bytes(garbage)
    assert_one_line(*run(tmp_path), path, "file is not a database")
    assert path.read_bytes() == garbage


def test_read_only_data_dir_without_a_database(tmp_path):
    data_dir = db_path(tmp_path).parent
    data_dir.mkdir(parents=True)
    data_dir.chmod(0o555)
    status, stderr = run(tmp_path, prefix=unprivileged())
    assert_one_line(status, stderr, db_path(tmp_path), "unable to open database file")
    assert list(data_dir.iterdir()) == []


def test_read_only_data_dir_with_a_database(tmp_path):
    path = db_path(tmp_path)
    Database(path).close()
    before = path.read_bytes()
    path.parent.chmod(0o555)
    status, stderr = run(tmp_path, prefix=unprivileged())
    assert_one_line(status, stderr, path, "attempt to write a readonly database")
    assert path.read_bytes() == before


def test_database_of_a_newer_release_is_refused_unchanged(tmp_path):
    path = db_path(tmp_path)
    Database(path).close()
    newer = len(MIGRATIONS) + 1
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version={newer}")
    conn.close()
    before = path.read_bytes()

    status, stderr = run(tmp_path)
    assert_one_line(
        status, stderr, path,
        f"its schema version {newer} is newer than this release knows ({len(MIGRATIONS)}):"
        " it was written by a newer release",
    )
    assert path.read_bytes() == before
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # not a frame written


def test_backup_of_a_corrupt_database_is_one_line(tmp_path):
    path = db_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(64 * 1024))
    target = tmp_path / "copy.db"
    status, stderr = run(tmp_path, "backup", str(target))
    assert "Traceback" not in stderr and status == 1
    assert stderr.splitlines() == [
        f"agent-coordinator: backup failed: file is not a database (copying {path} to {target})"
    ]
    assert not target.exists()
