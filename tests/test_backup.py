"""`python -m coordinator backup PATH` against a running server that keeps writing, and a
restore from the copy."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import apsw

from conftest import RunningServer
from coordinator_core.settings import Settings
from test_sessions import create, event

ROOT = Path(__file__).resolve().parent.parent


def run_backup(project_dir: Path, target: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGENT_ORCHESTRATOR_PROJECT_DIR": str(project_dir)}
    return subprocess.run(
        [sys.executable, "-m", "coordinator", "backup", str(target)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def test_backup_while_writing_is_consistent_and_restores(server, project_dir, tmp_path):
    for s in range(20):
        create(server, f"s{s}")
        for i in range(25):
            server.post(f"/sessions/s{s}/events", event(f"s{s}", tool_input={"i": i, "pad": "x" * 500}))
    before = server.get("/events/s7").json()["events"]

    stop = threading.Event()
    written = []

    def keep_writing():  # the server is busy during the whole backup
        while not stop.is_set() and len(written) < 5000:
            sid = f"w{len(written)}"
            create(server, sid)
            server.post(f"/sessions/{sid}/events", event(sid))
            written.append(sid)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        target = tmp_path / "copy.db"
        done = run_backup(project_dir, target)
    finally:
        stop.set()
        writer.join(timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"to {target}" in done.stdout
    assert written, "nothing was written during the backup"
    assert not target.with_name("copy.db-wal").exists()

    copy = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert copy.execute("PRAGMA foreign_key_check").fetchall() == []
        sessions = {row[0] for row in copy.execute("SELECT session_id FROM sessions")}
        assert {f"s{s}" for s in range(20)} <= sessions
        # One snapshot: every copied writer session came with its event (or neither was copied).
        copied = [sid for sid in written if sid in sessions]
        events = {row[0] for row in copy.execute("SELECT DISTINCT session_id FROM events")}
        assert all(sid in events for sid in copied[:-1])
        assert copy.execute("SELECT count(*) FROM events WHERE session_id LIKE 's%'").fetchone() == (500,)
    finally:
        copy.close()

    # Restore: the copy becomes the database of a (stopped) project; a server serves its data.
    restored_dir = tmp_path / "restored"
    (restored_dir / ".agent-orchestrator").mkdir(parents=True)
    shutil.copyfile(target, restored_dir / ".agent-orchestrator" / "observability.db")
    restored = RunningServer(Settings(project_dir=restored_dir, host="127.0.0.1")).start()
    try:
        assert restored.get("/events/s7").json()["events"] == before
    finally:
        restored.stop()


def test_backup_without_a_database_fails_cleanly(tmp_path):
    done = run_backup(tmp_path / "empty", tmp_path / "copy.db")
    assert done.returncode == 1
    assert done.stderr.startswith("agent-coordinator: backup failed: no database at ")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "empty").exists() and not (tmp_path / "copy.db").exists()
