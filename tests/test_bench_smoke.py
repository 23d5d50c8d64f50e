"""The benchmark's quick mode still runs end to end (numbers are not judged here), and its durable
limit app stores before it answers."""

import subprocess
import sys
from pathlib import Path

import requests

from bench.harness import DURABLE, Server

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_mode_runs_every_workload():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for workload in ("| ingest |", "| legacy ingest |", "| read 100 events |", "| read 1,000 sessions |",
                     "| fan-out 10 subscribers |", "| dispatch latency (50 runs/s) |", "| dispatch throughput |"):
        assert workload in proc.stdout
    for column in ("| coordinator /s |", "| durable app /s |", "| bare app /s |", "| ÷ durable /s |", "| ÷ bare /s |"):
        assert column in proc.stdout
    assert "| ingest /s | >= 0.75 |" in proc.stdout  # the targets table
    assert "| workload | empty /s |" in proc.stdout and "| 10,000 events /s |" in proc.stdout  # growth
    assert "lost" not in proc.stdout
    assert "coordinator RSS: idle" in proc.stdout
    assert "while 2 subscribers that never read replay them" in proc.stdout


def test_durable_limit_app_answers_writes_once_they_are_in_its_journal():
    server = Server("durable app", DURABLE)
    with server:
        journal = server.project_dir / "journal.log"
        url = f"http://127.0.0.1:{server.port}"
        event = b'{"event_type":"post_tool","session_id":"s1","timestamp":"t"}'
        writes = [("/sessions/s1/events", event), ("/events", event),
                  ("/runs", b'{"type":"start_session","prompt":"p"}')]
        for path, body in writes:
            r = requests.post(url + path, data=body, timeout=10)
            assert r.status_code == 200, r.text
            assert journal.read_bytes().endswith(body + b"\n")  # on disk before the answer
        run_id = r.json()["run_id"]
        r = requests.get(url + "/runner/runs?runner_id=lnch_000000000000", timeout=10)
        assert r.status_code == 200 and r.json()["run"] == {"run_id": run_id, "status": "claimed"}
        for step in ("started", "completed"):
            report = b'{"runner_id":"lnch_000000000000","step":"%s"}' % step.encode()
            r = requests.post(f"{url}/runner/runs/{run_id}/{step}", data=report, timeout=10)
            assert r.status_code == 200 and r.json() == {"ok": True}
            assert journal.read_bytes().endswith(report + b"\n")
        assert journal.read_bytes().count(b"\n") == 5
