"""Settings: defaults, every override, and loud failures that name the variable."""

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator_core.settings import Settings, SettingsError


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert (s.host, s.port) == ("0.0.0.0", 8765)
    assert s.project_dir == tmp_path
    assert s.db_path == tmp_path / ".agent-orchestrator" / "observability.db"
    assert s.agents_dir == tmp_path / ".agent-orchestrator" / "agents"
    assert s.cors_origins == ("*",)
    assert s.run_recovery_mode == "stale"
    assert (s.runner_poll_timeout, s.runner_heartbeat_interval) == (30, 60)
    assert (s.runner_stale_threshold, s.runner_remove_threshold) == (120, 600)
    assert (s.runner_lifecycle_interval, s.run_no_match_timeout) == (30, 300)
    assert s.debug_logging is False and s.auth_enabled is False
    assert s.broadcast_queue_size == 1000


def test_overrides(tmp_path):
    env = {
        "COORDINATOR_HOST": "127.0.0.1",
        "COORDINATOR_PORT": "18765",
        "AGENT_ORCHESTRATOR_PROJECT_DIR": str(tmp_path / "p"),
        "AGENT_ORCHESTRATOR_AGENTS_DIR": str(tmp_path / "a"),
        "DEBUG_LOGGING": "YES",
        "CORS_ORIGINS": "http://a, http://b",
        "RUN_RECOVERY_MODE": "all",
        "RUNNER_POLL_TIMEOUT": "2.5",
        "RUNNER_HEARTBEAT_INTERVAL": "5",
        "RUNNER_STALE_THRESHOLD": "7",
        "RUNNER_REMOVE_THRESHOLD": "9",
        "RUNNER_LIFECYCLE_INTERVAL": "1",
        "RUN_NO_MATCH_TIMEOUT": "3",
        "AUTH_ENABLED": "1",
        "AUTH0_DOMAIN": "example.test",
        "AUTH0_AUDIENCE": "aud",
        "BROADCAST_QUEUE_SIZE": "10",
    }
    s = Settings.from_env(env)
    assert (s.host, s.port) == ("127.0.0.1", 18765)
    assert s.db_path == tmp_path / "p" / ".agent-orchestrator" / "observability.db"
    assert s.agents_dir == tmp_path / "a"
    assert s.debug_logging is True
    assert s.cors_origins == ("http://a", " http://b")  # split on commas, not stripped
    assert s.run_recovery_mode == "all"
    assert s.runner_poll_timeout == 2.5
    assert (s.runner_heartbeat_interval, s.runner_stale_threshold) == (5, 7)
    assert (s.runner_remove_threshold, s.runner_lifecycle_interval, s.run_no_match_timeout) == (9, 1, 3)
    assert (s.auth_enabled, s.auth0_domain, s.auth0_audience) == (True, "example.test", "aud")
    assert s.broadcast_queue_size == 10


def test_unknown_recovery_mode_acts_as_stale():
    assert Settings.from_env({"RUN_RECOVERY_MODE": "bogus"}).run_recovery_mode == "stale"


@pytest.mark.parametrize(
    "var,value",
    [("RUNNER_POLL_TIMEOUT", "abc"), ("COORDINATOR_PORT", "99999"), ("BROADCAST_QUEUE_SIZE", "0")],
)
def test_bad_value_names_the_variable(var, value):
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


def test_bad_value_stops_startup_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "--port", "0"],
        env={"RUNNER_POLL_TIMEOUT": "abc", "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "RUNNER_POLL_TIMEOUT" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not Path(tmp_path, ".agent-orchestrator").exists()
