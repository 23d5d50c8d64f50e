"""Logs: one line per request, JSON lines for every logger with LOG_FORMAT=json, no secrets."""

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from websockets.sync.client import connect

from coordinator_core import logs
from test_sessions import event

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-token-value"
CONTENT = "private words of the agent"


class Lines:
    """The merged output of a process, line by line, read on a thread so waits have deadlines."""

    def __init__(self, proc: subprocess.Popen):
        self.items: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.items.put(line.rstrip("\n"))
        self.items.put(None)

    def next(self, deadline: float) -> str | None:
        line = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is not None:
            self.seen.append(line)
        return line

    def wait_for(self, pattern: str, seconds: float = 20.0) -> re.Match:
        deadline = time.monotonic() + seconds
        while (line := self.next(deadline)) is not None:
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"{pattern!r} never logged:\n" + "\n".join(self.seen))

    def rest(self, seconds: float = 20.0) -> list[str]:
        deadline = time.monotonic() + seconds
        while self.next(deadline) is not None:
            pass
        return self.seen


@contextlib.contextmanager
def serving(tmp_path: Path, **env: str):
    """`python -m coordinator` on a free port (text logs unless `env` says otherwise): the
    process, its URL and its output lines."""
    env = {**os.environ, "AGENT_ORCHESTRATOR_PROJECT_DIR": str(tmp_path), "LOG_FORMAT": "text", **env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = Lines(proc)
        yield proc, lines.wait_for(r"Uvicorn running on (http://127\.0\.0\.1:\d+)").group(1), lines
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_json_lines_one_per_request_without_secrets(tmp_path):
    with serving(tmp_path, LOG_FORMAT="json") as (proc, url, lines):
        assert requests.get(url + "/health", timeout=10).status_code == 200
        assert requests.get(url + f"/sessions?limit=5&api_key={SECRET}", timeout=10).status_code == 200
        assert requests.post(url + "/sessions", json={"session_id": "s"}, timeout=10).status_code == 200
        sent = event("s", "message", role="assistant", content=[{"type": "text", "text": CONTENT}])
        assert requests.post(url + "/sessions/s/events", json=sent, timeout=10).status_code == 200
        assert requests.get(url + "/nowhere", timeout=10).status_code == 404
        with connect(url.replace("http", "ws") + f"/ws?api_key={SECRET}") as ws:
            ws.recv(timeout=10)
        lines.wait_for(r'"path": "/ws"')
        assert requests.get(url + "/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)  # the last request line is still written
        output = lines.rest()
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal

    records = [json.loads(line) for line in output if line]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's lines too
    access = [
        (r["method"], r["path"], r["status"])
        for r in records
        if r["logger"] == "coordinator.access"
    ]
    assert access == [
        ("GET", "/health", 200),
        ("GET", "/sessions", 200),
        ("POST", "/sessions", 200),
        ("POST", "/sessions/s/events", 200),
        ("GET", "/nowhere", 404),
        ("WS", "/ws", 101),
        ("GET", "/health", 200),
    ]
    durations = [r["duration_ms"] for r in records if r["logger"] == "coordinator.access"]
    assert all(isinstance(d, float) and d >= 0 for d in durations)
    text = "\n".join(output)
    assert SECRET not in text and "api_key" not in text and CONTENT not in text


def test_server_writes_text_request_lines(tmp_path):
    with serving(tmp_path) as (_, url, lines):
        assert requests.get(url + f"/sessions/missing?api_key={SECRET}", timeout=10).status_code == 404
        line = lines.wait_for(r"coordinator\.access").string
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + r" INFO coordinator\.access: GET /sessions/missing 404 \d+\.\dms", line), line


def test_request_lines_of_an_embedded_app_are_log_records(server, caplog):
    with caplog.at_level(logging.INFO, logger="coordinator.access"):
        server.get("/sessions/missing?api_key=" + SECRET)
        deadline = time.monotonic() + 10
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.01)
    (record,) = caplog.records
    assert record.getMessage().startswith("GET /sessions/missing 404 ")
    assert record.getMessage().endswith("ms")
    assert SECRET not in record.getMessage()


def test_request_lines_waiting_to_be_written_are_all_written_in_order():
    # Lines logged on the event loop wait to go to the writer thread together; flushing (as at
    # shutdown) writes those still waiting; a line logged outside any loop goes on its own.
    script = """
import asyncio, sys
from coordinator_core import logs

def answered(n):
    logs.log_request({"type": "http", "method": "GET", "path": f"/waiting/{n}"}, 200, 0.00125)

logs.configure(False, False)

async def main():
    for n in range(100):
        answered(n)
    await asyncio.sleep(0)
    answered(100)
    logs.flush_request_lines()  # as at shutdown
    print("x: flushed", file=sys.stderr, flush=True)

asyncio.run(main())
answered(101)
logs.flush_request_lines()
print("x: flushed", file=sys.stderr, flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    messages = [line.split(": ", 1)[1] for line in done.stderr.splitlines()]
    lines = [f"GET /waiting/{n} 200 1.2ms" for n in range(102)]
    expected = lines[:101] + ["flushed", lines[101], "flushed"]
    assert messages == expected


def _access_record(created: float) -> logging.LogRecord:
    fields = {"method": "POST", "path": "/sessions/s/events", "status": 201, "duration_ms": 0.875}
    message = "POST /sessions/s/events 201 0.9ms"
    record = logs.access_log.makeRecord(
        logs.access_log.name, logging.INFO, "", 0, message, (), None, extra={"fields": fields}
    )
    record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
    return record


# Around second boundaries, so that the time written once per second is checked too.
TIMES = [1764012345.0, 1764012345.0004, 1764012345.9996, 1764012346.5, 1764012346.999]


def test_text_lines_keep_the_standard_logging_time():
    for created in TIMES:
        record = _access_record(created)
        assert logs.TextFormatter().format(record) == logging.Formatter(logs.TEXT_FORMAT).format(record)


def test_request_lines_read_like_every_other_record():
    # Request lines are written without a LogRecord: they must come out as one would have.
    for created in TIMES:
        line = ("POST", "/sessions/s/events", 201, 0.875)
        assert logs.text_request_line(created, *line) == logs.TextFormatter().format(_access_record(created))
        assert logs.json_request_line(created, *line) == logs.JsonFormatter().format(_access_record(created))
    assert json.loads(logs.json_request_line(TIMES[0], *line)) == {
        "time": "2025-11-24T19:25:45.000+00:00",
        "level": "INFO",
        "logger": "coordinator.access",
        "message": "POST /sessions/s/events 201 0.9ms",
        "method": "POST",
        "path": "/sessions/s/events",
        "status": 201,
        "duration_ms": 0.875,
    }
