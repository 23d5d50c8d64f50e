"""The benchmark's quick mode still runs end to end (numbers are not judged here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_mode_runs_every_workload():
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for workload in ("| ingest |", "| legacy ingest |", "| read 100 events |", "| read 1,000 sessions |",
                     "| fan-out 10 subscribers |", "| dispatch latency (50 runs/s) |", "| dispatch throughput |",
                     "| growth ingest, empty |"):
        assert workload in proc.stdout
    for column in ("| coordinator /s |", "| durable app /s |", "| bare app /s |", "| ÷ durable /s |", "| ÷ bare /s |"):
        assert column in proc.stdout
    assert "| ingest /s | >= 0.75 |" in proc.stdout  # the targets table
    assert "lost" not in proc.stdout
    assert "coordinator RSS: idle" in proc.stdout
    assert "while 2 subscribers that never read replay them" in proc.stdout
